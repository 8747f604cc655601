"""Capability per arm and the alignment tax: how much multiple-choice accuracy an arm lost against the baseline.

`alignment_tax_<set>` = accuracy(baseline) − accuracy(arm), so a positive tax is capability lost. Both arms
answered the same questions (checked by their questions hash), so the interval is paired: one set of
question resamples (plain bootstrap, percentile) serves every run, and with several seeds the seeds are
resampled too (`contrasts.combine_over_seeds`, as for AQI). Per-arm cells: one seed keeps the run's Wilson
interval; several seeds get the same two-stage bootstrap of the arm alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ecliptica.evaluation.stats import iid_indices

from .contrasts import StudyContext, _finish, combine_over_seeds, not_answerable, pair_runs_by_seed
from .records import BASELINE

CAPABILITY_SETS = ("mmlu", "openbookqa", "commonsenseqa")
METHOD = "paired bootstrap over questions (percentile)"


def capability_columns() -> list[str]:
    cols = []
    for name in CAPABILITY_SETS:
        acc, tax = f"accuracy_{name}", f"alignment_tax_{name}"
        cols += [acc, f"{acc}_sd", f"{acc}_low", f"{acc}_high", tax, f"{tax}_low", f"{tax}_high"]
    return cols


def _correct(record: Mapping[str, Any], name: str):
    entry = getattr(record["eval"], f"accuracy_{name}")
    if entry is None or not entry.correct:
        return None, None
    return np.frombuffer(entry.correct.encode(), dtype=np.uint8) == ord("1"), entry.questions_hash


def question_contrast(ctx: StudyContext, name: str, terms: Mapping[str, float], comparison: str) -> dict[str, Any]:
    """Σ w·accuracy(arm) on set `name`, paired over the questions every run answered."""
    metric = f"accuracy_{name}"
    plan, reason = pair_runs_by_seed(ctx.by_arm, list(terms))
    if reason:
        return not_answerable(comparison, metric, reason)
    runs = {(a, p[a]): _correct(ctx.by_arm[a][p[a]], name) for _, p in plan for a in terms}
    lacking = [f"{a} seed {s}" for (a, s), (c, _) in runs.items() if c is None]
    if lacking:
        return not_answerable(comparison, metric, f"not answerable: no per-question {metric} for {', '.join(lacking)}")
    if len({h for _, h in runs.values()}) > 1:
        return not_answerable(comparison, metric, "not answerable: the runs answered different questions")
    n = next(iter(runs.values()))[0].size
    idx = iid_indices(n, ctx.n_resamples, ctx.seed)
    estimates = np.array([sum(w * runs[(a, p[a])][0].mean() for a, w in terms.items()) for _, p in plan])
    samples = np.stack([sum(w * runs[(a, p[a])][0][idx].mean(axis=1) for a, w in terms.items()) for _, p in plan])
    result = combine_over_seeds(estimates, samples, ctx.alpha, "percentile", np.random.default_rng(ctx.seed + 3))
    method = METHOD if len(plan) == 1 else "two-stage bootstrap: seeds, then questions (paired), percentile"
    return _finish(result, plan, estimates, comparison, metric, ctx.alpha, method)


def alignment_tax(ctx: StudyContext, name: str, arm: str) -> dict[str, Any]:
    if arm == BASELINE:
        return {"answerable": False, "reason": "reference arm"}
    return question_contrast(ctx, name, {BASELINE: 1.0, arm: -1.0}, f"{BASELINE} − {arm}")


def capability_row(ctx: StudyContext, arm: str) -> dict[str, Any]:
    """The capability columns of one arm's table row."""
    row: dict[str, Any] = {}
    runs = list(ctx.by_arm[arm].values())
    for name in CAPABILITY_SETS:
        acc, tax = f"accuracy_{name}", f"alignment_tax_{name}"
        entries = [getattr(r["eval"], acc) for r in runs]
        values = [e.rate for e in entries if e is not None]
        if not values:
            continue
        row[acc] = float(np.mean(values))
        row[f"{acc}_sd"] = float(np.std(values, ddof=1)) if len(values) > 1 else None
        if len(runs) == 1:
            row[f"{acc}_low"], row[f"{acc}_high"] = entries[0].low, entries[0].high
        else:
            c = question_contrast(ctx, name, {arm: 1.0}, arm)
            if c.get("answerable"):
                row[f"{acc}_low"], row[f"{acc}_high"] = c["low"], c["high"]
        t = alignment_tax(ctx, name, arm)
        if t.get("answerable"):
            row.update({tax: t["estimate"], f"{tax}_low": t["low"], f"{tax}_high": t["high"]})
    return row


def capability_section(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Markdown: accuracy per arm and set, and the alignment tax against the baseline; [] without capability."""
    from .questions import num

    sets = [s for s in CAPABILITY_SETS if any(r.get(f"accuracy_{s}") is not None for r in rows)]
    if not sets:
        return []

    def cell(r, key, signed=False):
        if r.get(key) is None:
            return "—" if r["arm"] == BASELINE and key.startswith("alignment_tax") else "n/a"
        text = num(r[key], 3, signed)
        if r.get(f"{key}_low") is not None:
            text += f" [{num(r[f'{key}_low'], 3, signed)}, {num(r[f'{key}_high'], 3, signed)}]"
        return text

    header = ["arm"] + [h for s in sets for h in (f"accuracy {s}", f"alignment tax {s}")]
    lines = ["## Capability (alignment tax)", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["arm"]] + [c for s in sets for c in (cell(r, f"accuracy_{s}"), cell(r, f"alignment_tax_{s}", True))]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Accuracy: zero-shot multiple choice, argmax of the length-normalised log-likelihood (docs/evaluation.md, "
        "Capability); one seed: Wilson interval. Alignment tax = baseline accuracy − arm accuracy (positive: "
        f"capability lost), {METHOD}; with several seeds, seeds then questions.",
        "",
    ]
    return lines
