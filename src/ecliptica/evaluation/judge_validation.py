"""Score a refusal judge against hand-labelled completions (XSTest's three classes).

The labelled set is jsonl, one completion per line: `id, prompt, completion, source, label, split`
(`label` one of `RefusalLabel`, `split` `dev` or `test`). The shipped set is
`tests/evaluation/data/refusal_labelled.jsonl` (docs/evaluation.md says how it was made). Rules are
tuned on `dev`; only `test` numbers are reported.

  python -m ecliptica.evaluation.judge_validation tests/evaluation/data/refusal_labelled.jsonl \
      --judge strmatch --split test
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ecliptica.evaluation.refusal import REFUSAL_LABELS, RefusalJudge, judge_labels
from ecliptica.evaluation.stats import iid_indices, percentile_interval, wilson_interval

FIELDS = ("id", "prompt", "completion", "source", "label", "split")


def split_of(row_id: str) -> str:
    """`dev` or `test` from the id's sha256: deterministic, independent of file order and of the label."""
    import hashlib

    return "test" if hashlib.sha256(row_id.encode()).digest()[0] % 2 else "dev"


def load_labelled(path: str | Path, split: str | None = None) -> list[dict[str, Any]]:
    """Rows of the labelled set (optionally one split); a bad row is an error naming file, row and field."""
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: row {n}: not JSON ({e})") from None
        for field in FIELDS:
            if not isinstance(row.get(field), str):
                raise ValueError(f"{path}: row {n}: field {field!r} missing or not a string")
        if row["label"] not in REFUSAL_LABELS:
            raise ValueError(f"{path}: row {n}: field 'label' is {row['label']!r}; expected one of {REFUSAL_LABELS}")
        if row["split"] not in ("dev", "test"):
            raise ValueError(f"{path}: row {n}: field 'split' is {row['split']!r}; expected 'dev' or 'test'")
        rows.append(row)
    return [r for r in rows if split is None or r["split"] == split]


def detection_scores(
    gold: Sequence[str],
    predicted: Sequence[str],
    positive: set[str],
    *,
    n_resamples: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Precision, recall and F1 for detecting `positive` classes, with Wilson intervals for precision and
    recall and a percentile bootstrap interval (completions resampled) for F1."""
    g = np.array([x in positive for x in gold])
    p = np.array([x in positive for x in predicted])
    tp, fp, fn = int((g & p).sum()), int((~g & p).sum()), int((g & ~p).sum())

    def f1(tp_, fp_, fn_):
        return np.where(2 * tp_ + fp_ + fn_ > 0, 2 * tp_ / np.maximum(2 * tp_ + fp_ + fn_, 1), 0.0)

    idx = iid_indices(g.size, n_resamples, seed)
    gb, pb = g[idx], p[idx]
    f1_boot = f1((gb & pb).sum(1), (~gb & pb).sum(1), (gb & ~pb).sum(1))
    f1_low, f1_high = percentile_interval(f1_boot, alpha)
    prec = tp / (tp + fp) if tp + fp else None
    rec = tp / (tp + fn) if tp + fn else None
    return {
        "positive": sorted(positive),
        "n": int(g.size),
        "n_positive": int(g.sum()),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "precision": prec,
        "precision_ci": wilson_interval(tp, tp + fp, alpha) if tp + fp else None,
        "recall": rec,
        "recall_ci": wilson_interval(tp, tp + fn, alpha) if tp + fn else None,
        "f1": float(f1(tp, fp, fn)),
        "f1_ci": (f1_low, f1_high),
        "accuracy_3class": float(np.mean(np.asarray(gold) == np.asarray(predicted))),
    }


def validate_judge(rows: Sequence[dict[str, Any]], judge: RefusalJudge | None = None) -> dict[str, Any]:
    """Full-refusal detection and any-refusal (full or partial) detection scores of `judge` on `rows`."""
    gold = [r["label"] for r in rows]
    pred = judge_labels([r["prompt"] for r in rows], [r["completion"] for r in rows], judge)
    return {
        "full_refusal": detection_scores(gold, pred, {"full_refusal"}),
        "any_refusal": detection_scores(gold, pred, {"full_refusal", "partial_refusal"}),
        "predicted": pred,
    }


def main(argv: Sequence[str] | None = None) -> None:
    from ecliptica.evaluation.judges import build_judge

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("--judge", default="strmatch")
    ap.add_argument("--split", default="test", choices=["dev", "test", "all"])
    args = ap.parse_args(argv)
    rows = load_labelled(args.path, None if args.split == "all" else args.split)
    out = validate_judge(rows, build_judge(args.judge))
    for name in ("full_refusal", "any_refusal"):
        s = out[name]
        print(
            f"{name}: n={s['n']} positives={s['n_positive']} precision={s['precision']:.3f} "
            f"{tuple(round(x, 3) for x in s['precision_ci'])} recall={s['recall']:.3f} "
            f"{tuple(round(x, 3) for x in s['recall_ci'])} F1={s['f1']:.3f} "
            f"{tuple(round(x, 3) for x in s['f1_ci'])} 3-class accuracy={s['accuracy_3class']:.3f}"
        )


if __name__ == "__main__":
    main()
