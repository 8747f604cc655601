"""Agreement between two annotators' refusal labels: Cohen's kappa, on XSTest's three classes and on any refusal.

Each file is jsonl with at least `id` and `label` (one of `RefusalLabel`); rows are matched by id, and an id in
one file but not the other is an error (a kappa over a silently shrunk set would mislead). When the second
annotator labelled a subset of the first's rows, `--subset` says so: kappa is then over the second file's ids, and
every one of them must be in the first file.

  python -m ecliptica.evaluation.agreement first_annotator.jsonl second_annotator.jsonl [--subset]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ecliptica.evaluation.refusal import REFUSAL_LABELS


def cohen_kappa(a: Sequence[str], b: Sequence[str]) -> float:
    """(p_o - p_e) / (1 - p_e): observed agreement against the agreement expected from each annotator's own
    label frequencies. 1 when both use a single identical label (no disagreement is possible)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"kappa needs two equally long, non-empty label lists, got {len(a)} and {len(b)}")
    classes = sorted(set(a) | set(b))
    x, y = np.array(a), np.array(b)
    observed = float(np.mean(x == y))
    expected = float(sum(np.mean(x == c) * np.mean(y == c) for c in classes))
    return 1.0 if expected == 1.0 else (observed - expected) / (1.0 - expected)


def load_labels(path: str | Path) -> dict[str, str]:
    """{id: label}; a bad row is an error naming file, row and field."""
    labels: dict[str, str] = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: row {n}: not JSON ({e})") from None
        for field in ("id", "label"):
            if not isinstance(row.get(field), str):
                raise ValueError(f"{path}: row {n}: field {field!r} missing or not a string")
        if row["label"] not in REFUSAL_LABELS:
            raise ValueError(f"{path}: row {n}: field 'label' is {row['label']!r}; expected one of {REFUSAL_LABELS}")
        if row["id"] in labels:
            raise ValueError(f"{path}: row {n}: field 'id' {row['id']!r} repeats an earlier row")
        labels[row["id"]] = row["label"]
    return labels


def agreement(path_a: str | Path, path_b: str | Path, subset: bool = False) -> dict:
    """Kappa and raw agreement on the three classes and on any refusal, over the ids both files label
    (`subset`: over the second file's ids, which the first must all label)."""
    a, b = load_labels(path_a), load_labels(path_b)
    if subset:
        a = {i: a[i] for i in b if i in a}
    if set(a) != set(b):
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise ValueError(
            f"{path_a} and {path_b} label different ids: only in the first {only_a[:5]}, "
            f"only in the second {only_b[:5]}"
        )
    ids = sorted(a)
    la, lb = [a[i] for i in ids], [b[i] for i in ids]
    ra = ["refusal" if x != "full_compliance" else "compliance" for x in la]
    rb = ["refusal" if x != "full_compliance" else "compliance" for x in lb]
    return {
        "n": len(ids),
        "kappa_3class": cohen_kappa(la, lb),
        "agreement_3class": float(np.mean(np.array(la) == np.array(lb))),
        "kappa_any_refusal": cohen_kappa(ra, rb),
        "agreement_any_refusal": float(np.mean(np.array(ra) == np.array(rb))),
    }


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("first")
    ap.add_argument("second")
    ap.add_argument("--subset", action="store_true", help="the second file labels a subset of the first's ids")
    args = ap.parse_args(argv)
    print(json.dumps(agreement(args.first, args.second, subset=args.subset), indent=1))


if __name__ == "__main__":
    main()
