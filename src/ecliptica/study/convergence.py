"""Q2 as convergence: does GRIT reach a validation level sooner, or stay higher along the way?

From each run's validation curve (metrics.jsonl rows that carry the validation metric):

* `steps_to_level`: the first logged step at which the metric reaches `level` (>= for a metric where higher
  is better, <= for a loss), and the cumulative GPU-seconds logged on that row. No interpolation between
  logged steps: the answer is as coarse as the validation interval. A run that never reaches it has none.
* `auc`: the trapezoid area under the metric over steps divided by the step range (first to last logged
  step), i.e. the curve's mean height; comparable across runs logged over the same steps.

Each arm `X` is compared with its GRIT twin `X_grit` at the same learning rate: per seed `twin - arm`
(seeds pair: same data order), then the mean over seeds with a t-interval over seeds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .contrasts import t_over_seeds
from .frontier_config import ConvergenceSection
from .frontier_points import read_jsonl_rows


def validation_curve(rows: Sequence[Mapping[str, Any]], s: ConvergenceSection) -> list[dict[str, float]]:
    """The rows that carry the validation metric, as {step, value, compute}, in step order."""
    curve = []
    for r in rows:
        if s.metric in r and r[s.metric] is not None:
            compute = r.get(s.compute_key)
            curve.append(
                {
                    "step": float(r[s.step_key]),
                    "value": float(r[s.metric]),
                    "compute": None if compute is None else float(compute),
                }
            )
    return sorted(curve, key=lambda c: c["step"])


def steps_to_level(curve: Sequence[Mapping[str, float]], s: ConvergenceSection) -> tuple[float | None, float | None]:
    """(step, compute) of the first logged row at or beyond the level; (None, None) if never reached."""
    for c in curve:
        reached = c["value"] >= s.level if s.higher_is_better else c["value"] <= s.level
        if reached:
            return c["step"], c["compute"]
    return None, None


def normalised_auc(curve: Sequence[Mapping[str, float]]) -> float | None:
    """Trapezoid area under value-vs-step divided by the step range; None with fewer than two rows."""
    if len(curve) < 2:
        return None
    x = np.array([c["step"] for c in curve])
    y = np.array([c["value"] for c in curve])
    span = x[-1] - x[0]
    if span <= 0:
        return None
    return float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)) / span)


def run_convergence(metrics_path: str | Path, s: ConvergenceSection) -> dict[str, Any]:
    """One run's convergence numbers (and its curve, for the figure)."""
    path = Path(metrics_path)
    curve = validation_curve(read_jsonl_rows(path), s) if path.exists() else []
    step, compute = steps_to_level(curve, s)
    return {
        "steps_to_level": step,
        "gpu_seconds_to_level": compute,
        "auc": normalised_auc(curve),
        "last_step": curve[-1]["step"] if curve else None,
        "curve": curve,
        "source": str(path),
    }


QUANTITIES = ("steps_to_level", "gpu_seconds_to_level", "auc")


def grit_twins(arms: Sequence[str]) -> list[tuple[str, str]]:
    """(arm, its GRIT twin) for every arm `X` whose `X_grit` is also an arm."""
    return [(a, f"{a}_grit") for a in arms if not a.endswith("_grit") and f"{a}_grit" in arms]


def convergence_tests(
    runs: Mapping[tuple[str, float, int], Mapping[str, Any]],
    s: ConvergenceSection,
    alpha: float = 0.05,
) -> list[dict[str, Any]]:
    """`twin - arm` for each GRIT pair, learning rate and quantity; `runs` maps (arm, lr, seed) -> run_convergence.

    Not answerable (with the reason) where a seed never reached the level, a run logged no validation curve,
    or the seeds agree exactly (a t-interval needs spread)."""
    arms = list(dict.fromkeys(a for a, _, _ in runs))
    tests = []
    for arm, twin in grit_twins(arms):
        for lr in sorted({lr for a, lr, _ in runs if a == arm}):
            seeds = sorted(_seeds(runs, arm, lr) & _seeds(runs, twin, lr))
            for q in QUANTITIES:
                base = {
                    "comparison": f"{twin} − {arm}",
                    "outcome": f"convergence: {q}",
                    "lr": lr,
                    "metric": s.metric,
                    "level": s.level if q != "auc" else None,
                }
                if not seeds:
                    tests.append(
                        {
                            **base,
                            "answerable": False,
                            "reason": f"not answerable: {arm} and {twin} share no seed at lr {lr:g}",
                        }
                    )
                    continue
                pairs = [(runs[(arm, lr, sd)][q], runs[(twin, lr, sd)][q]) for sd in seeds]
                lacking = [sd for sd, (a, b) in zip(seeds, pairs) if a is None or b is None]
                if lacking:
                    why = "never reached the level" if q != "auc" else "logged fewer than two validation rows"
                    tests.append(
                        {**base, "answerable": False, "reason": f"not answerable: seed(s) {lacking}: a run {why}"}
                    )
                    continue
                diffs = np.array([b - a for a, b in pairs])
                entry = {**base, "per_seed": {str(sd): float(d) for sd, d in zip(seeds, diffs)}, "n_seeds": len(seeds)}
                if len(seeds) < 2 or np.ptp(diffs) == 0.0:
                    tests.append(
                        {
                            **entry,
                            "answerable": False,
                            "reason": f"not answerable: {len(seeds)} seed(s) with no spread in {q} ({diffs.mean():+.4g})",
                        }
                    )
                    continue
                tests.append(
                    {
                        **entry,
                        "answerable": True,
                        **t_over_seeds(diffs, alpha),
                        "alpha": alpha,
                        "method": "t-interval over seeds of paired differences",
                    }
                )
    return tests


def arm_summary(runs: Mapping[tuple[str, float, int], Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per (arm, lr): the mean over seeds of each quantity (None where any seed lacks it) and the seeds' values."""
    rows = []
    for arm, lr in dict.fromkeys((a, lr) for a, lr, _ in runs):
        seeds = sorted(_seeds(runs, arm, lr))
        row: dict[str, Any] = {"arm": arm, "lr": lr, "n_seeds": len(seeds)}
        for q in QUANTITIES:
            values = [runs[(arm, lr, sd)][q] for sd in seeds]
            row[q] = float(np.mean(values)) if values and all(v is not None for v in values) else None
            row[f"{q}_per_seed"] = values
        rows.append(row)
    return rows


def _seeds(runs: Mapping[tuple[str, float, int], Any], arm: str, lr: float) -> set[int]:
    return {seed for a, rate, seed in runs if a == arm and rate == lr}
