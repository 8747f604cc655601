"""The paper's table: one row per arm, each cell named after the number it shows (the CSV columns).

Per-arm values are the evaluation's recorded numbers (mean over seeds with several); ΔAQI vs the
baseline is the paired contrast of ``contrasts.py`` (per comparison, not corrected for
multiplicity: the research questions carry the corrected tests).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .capability import capability_columns, capability_row
from .contrasts import StudyContext, contrast, has_prompt_stage
from .records import BASELINE

# the behaviour AQI (docs/aqi.md) beside `aqi`, the prompt-representation AQI; mean over seeds, t-interval
BEHAVIOUR_AQI = ("aqi_completion", "aqi_completion_lexical", "aqi_last_prompt", "aqi_learned")
BEHAVIOUR_AQI_COLUMNS = [f"{k}{s}" for k in BEHAVIOUR_AQI for s in ("", "_low", "_high")]
CSV_COLUMNS = [
    "arm",
    "method",
    "optimizer",
    "placement",
    "n_seeds",
    "seeds",
    "ci_over",
    "aqi",
    "aqi_sd",
    "aqi_low",
    "aqi_high",
    "delta_aqi",
    "delta_aqi_low",
    "delta_aqi_high",
    "delta_aqi_p",
    "delta_aqi_significant",
    "probe_auroc",
    "probe_auroc_low",
    "probe_auroc_high",
    *BEHAVIOUR_AQI_COLUMNS,
    "refusal_rate_unsafe",
    "refusal_rate_unsafe_sd",
    "refusal_rate_unsafe_low",
    "refusal_rate_unsafe_high",
    "over_refusal_rate_safe",
    "over_refusal_rate_safe_sd",
    "over_refusal_rate_safe_low",
    "over_refusal_rate_safe_high",
    "perplexity",
    "perplexity_sd",
    "kl_mean_token",
    "collapsed",
    "train_minutes",
    "train_minutes_sd",
    "peak_vram_gib",
    "tokens_per_s",
    "compute_hours",
    "compute_device",
    "efficiency",
    "efficiency_low",
    "efficiency_high",
    "efficiency_unit",
    "overrides",
    *capability_columns(),
]
RATES = ("refusal_rate_unsafe", "over_refusal_rate_safe")


def summarize_over_seeds(
    values: Sequence[float | None],
    run_ci: tuple[float, float] | None,
    alpha: float,
    bounds: tuple[float, float] | None = None,
):
    """(mean, sd, low, high). One run: its own CI. Several: mean ± t-interval over seeds, clipped to
    `bounds` (a rate's t-interval can otherwise leave [0, 1] with few, spread-out seeds)."""
    vals = np.array([v for v in values if v is not None], dtype=float)
    if vals.size == 0:
        return None, None, None, None
    if vals.size == 1:
        low, high = run_ci if run_ci else (None, None)
        return float(vals[0]), None, low, high
    from scipy.stats import t

    mean, sd = float(vals.mean()), float(vals.std(ddof=1))
    half = float(t.ppf(1 - alpha / 2, vals.size - 1)) * sd / math.sqrt(vals.size)
    low, high = mean - half, mean + half
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return mean, sd, low, high


def _interval_of(runs: Sequence[dict], key: str, alpha: float):
    entries = [getattr(r["eval"], key) for r in runs]
    value_key = "rate" if key in RATES else "value"
    values = [getattr(e, value_key) if e else None for e in entries]
    single = entries[0] if len(entries) == 1 and entries[0] else None
    run_ci = (single.low, single.high) if single else None
    return summarize_over_seeds(values, run_ci, alpha, bounds=(0.0, 1.0) if key in RATES else None)


def seed_and_prompt_interval(ctx: StudyContext, arm: str, key: str):
    """(mean, sd, low, high) of an arm with several seeds: the interval is the two-stage bootstrap that
    the contrasts use (seeds, then prompts; `contrast` with the arm alone), so it includes the
    prompt-sampling error. A t-interval over seeds has none: three identical seeds of an untrained
    arm gave [x, x]. Falls back to the t-interval where the contrast has no prompt stage (AQI without
    embeddings) or cannot be made; one seed keeps the run's own CI."""
    runs = list(ctx.by_arm[arm].values())
    mean, sd, low, high = _interval_of(runs, key, ctx.alpha)
    if len(runs) < 2 or mean is None:
        return mean, sd, low, high
    c = contrast(ctx, key, {arm: 1.0}, arm)
    if not c.get("answerable") or not has_prompt_stage(c):
        # identical seeds and no prompt stage: a t-interval would be [x, x]; show no interval rather than that
        return (mean, sd, low, high) if sd else (mean, sd, None, None)
    low, high = c["low"], c["high"]
    if key in RATES:
        low, high = max(low, 0.0), min(high, 1.0)
    return mean, sd, low, high


def _scalar_of(runs: Sequence[dict], key: str) -> tuple[float | None, float | None]:
    vals = [float(v) for r in runs if (v := getattr(r["eval"], key)) is not None]
    if not vals:
        return None, None
    return float(np.mean(vals)), (float(np.std(vals, ddof=1)) if len(vals) > 1 else None)


def _collapse_flag(runs: Sequence[dict]) -> str | None:
    known = [bool(f) for r in runs if (f := r["eval"].collapsed) is not None]
    if not known:
        return None
    hits = sum(known)
    if len(known) == 1:
        return "yes" if hits else "no"
    return f"yes ({hits}/{len(known)} seeds)" if hits else "no"


def training_summary(runs: Sequence[dict]) -> dict[str, Any]:
    trains = [r["train"] for r in runs if r.get("train")]
    if not trains:
        return {
            "train_minutes": None,
            "train_minutes_sd": None,
            "peak_vram_gib": None,
            "tokens_per_s": None,
            "compute_hours": None,
            "compute_device": None,
        }
    minutes = [t["train_seconds"] / 60 for t in trains]
    # k workers sharing one device each get about 1/k of it, so a run's device-hours are its wall time / k
    hours = [
        t["train_seconds"] * (t.get("num_processes") or 1) / (t.get("device_shared_by") or 1) / 3600 for t in trains
    ]
    vram = [t.get("peak_gpu_memory_gib") for t in trains]
    on_gpu = all(v is not None for v in vram)
    return {
        "train_minutes": float(np.mean(minutes)),
        "train_minutes_sd": float(np.std(minutes, ddof=1)) if len(minutes) > 1 else None,
        "peak_vram_gib": float(np.mean(vram)) if on_gpu else None,
        "tokens_per_s": float(np.mean([t["tokens_per_s"] for t in trains])),
        "compute_hours": float(np.mean(hours)),
        "compute_device": "GPU" if on_gpu else "CPU",
    }


def _efficiency(delta: dict[str, Any], training: dict[str, Any]) -> dict[str, Any]:
    """ΔAQI per compute-hour; hours are treated as fixed, so the ΔAQI interval scales by 1/hours."""
    hours, device = training["compute_hours"], training["compute_device"]
    if not delta.get("answerable") or not hours:
        return {"efficiency": None, "efficiency_low": None, "efficiency_high": None, "efficiency_unit": None}
    return {
        "efficiency": delta["estimate"] / hours,
        "efficiency_low": delta["low"] / hours,
        "efficiency_high": delta["high"] / hours,
        "efficiency_unit": f"ΔAQI per {device}-hour",
    }


def _format_overrides(runs: Sequence[dict]) -> str:
    variants = []
    for r in runs:
        text = "; ".join(f"{k}={v}" for k, v in sorted((r.get("overrides") or {}).items()))
        if text not in variants:
            variants.append(text)
    return " | ".join(v or "—" for v in variants) if len(variants) > 1 else variants[0]


def delta_vs_baseline(ctx: StudyContext, arm: str) -> dict[str, Any]:
    if arm == BASELINE:
        return {"answerable": False, "reason": "reference arm"}
    return contrast(ctx, "aqi", {arm: 1.0, BASELINE: -1.0}, f"{arm} − {BASELINE}")


def arm_row(ctx: StudyContext, arm: str) -> dict[str, Any]:
    runs = list(ctx.by_arm[arm].values())
    first = runs[0]
    delta = delta_vs_baseline(ctx, arm)
    row: dict[str, Any] = {
        "arm": arm,
        "method": first["method"],
        "optimizer": first.get("optimizer"),
        "placement": first.get("placement"),
        "n_seeds": len(runs),
        "seeds": " ".join(str(s) for s in ctx.by_arm[arm]),
        "ci_over": "prompts (run bootstrap)" if len(runs) == 1 else "seeds, then prompts (two-stage bootstrap)",
    }
    row.update(dict(zip(("aqi", "aqi_sd", "aqi_low", "aqi_high"), seed_and_prompt_interval(ctx, arm, "aqi"))))
    auroc = _interval_of(runs, "probe_auroc", ctx.alpha)
    row.update({"probe_auroc": auroc[0], "probe_auroc_low": auroc[2], "probe_auroc_high": auroc[3]})
    row.update(_delta_columns(delta))
    for key in BEHAVIOUR_AQI:
        mean, _, low, high = _interval_of(runs, key, ctx.alpha)
        row.update({key: mean, f"{key}_low": low, f"{key}_high": high})
    for key in RATES:
        row.update(dict(zip((key, f"{key}_sd", f"{key}_low", f"{key}_high"), seed_and_prompt_interval(ctx, arm, key))))
    row["perplexity"], row["perplexity_sd"] = _scalar_of(runs, "perplexity")
    row["kl_mean_token"], _ = _scalar_of(runs, "kl_mean_token")
    row["collapsed"] = _collapse_flag(runs)
    training = training_summary(runs)
    row.update(training)
    row.update(_efficiency(delta, training))
    row["overrides"] = _format_overrides(runs)
    row.update(capability_row(ctx, arm))
    return {c: row.get(c) for c in CSV_COLUMNS}


def _delta_columns(delta: dict[str, Any]) -> dict[str, Any]:
    if not delta.get("answerable"):
        return {
            "delta_aqi": None,
            "delta_aqi_low": None,
            "delta_aqi_high": None,
            "delta_aqi_p": None,
            "delta_aqi_significant": None,
        }
    return {
        "delta_aqi": delta["estimate"],
        "delta_aqi_low": delta["low"],
        "delta_aqi_high": delta["high"],
        "delta_aqi_p": delta["p_value"],
        "delta_aqi_significant": delta["significant"],
    }


def build_table(ctx: StudyContext) -> list[dict[str, Any]]:
    return [arm_row(ctx, arm) for arm in ctx.arms]
