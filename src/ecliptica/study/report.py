"""Study report: the paper's table (one row per arm), the research questions answered from the
numbers, and the figures.

Entry point: ``build_report(records, out_dir, n_resamples=1000, seed=0, alpha=0.05)``. It takes one
``StudyRecord`` per (arm, seed) and writes ``results.md``, ``results.csv``, ``results.json`` and
``figures/`` (PNG + PDF) into ``out_dir``. docs/study.md explains how the numbers are read.

Statistics are not re-derived here: AQI is ``AqiStat`` and every paired comparison uses the prompt
resamples of ``ecliptica.evaluation.stats`` (``paired_bootstrap_test`` directly for two arms with one
seed; the same ``resample_indices``/``evaluate_on_resamples`` draws plus a seed stage otherwise).
"""
from __future__ import annotations

import csv
import io
import json
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NotRequired, TypedDict

import numpy as np

from ecliptica.evaluation.metrics import AqiStat
from ecliptica.runio import atomic_write_text, read_jsonl_tolerant
from ecliptica.evaluation.stats import (  # private helpers reused so intervals/p-values match stats.py exactly
    _interval,
    _two_sided_bootstrap_p,
    evaluate_on_resamples,
    paired_bootstrap_test,
    resample_indices,
)

__all__ = [
    "StudyRecord",
    "TrainInfo",
    "EvalInfo",
    "PromptMismatchError",
    "build_report",
    "CSV_COLUMNS",
    "ARM_ORDER",
]

# --------------------------------------------------------------------------- record schema


class Interval(TypedDict):
    value: float
    low: float
    high: float


class RateInterval(TypedDict):
    rate: float
    low: float
    high: float
    n: int


class TrainInfo(TypedDict):
    train_seconds: float  # wall time of the optimisation loop (one process)
    tokens_per_s: float
    peak_gpu_memory_gib: float | None  # None: trained on CPU
    train_tokens: int
    num_processes: int  # GPUs (or CPU processes) that ran for train_seconds each
    device_shared_by: NotRequired[int | None]  # runs sharing each device at once (parallel workers); None/absent = 1


class EvalInfo(TypedDict, total=False):
    aqi: Interval  # estimate and the run's own bootstrap CI over prompts
    probe_auroc: Interval | None
    refusal_unsafe: RateInterval | None  # refusal rate on unsafe prompts (higher is better)
    over_refusal_safe: RateInterval | None  # refusal rate on safe prompts (lower is better)
    benign_ppl: float | None  # perplexity on benign data (capability drift)
    benign_kl: float | None
    collapsed: bool | None


class StudyRecord(TypedDict):
    """One (arm, seed) run of the study, as produced by the study runner.

    ``embeddings_path`` is an ``.npz`` with ``X`` (n x d float32), ``labels`` (n, 'safe'/'unsafe'),
    ``axioms`` (n) and ``prompt_ids`` (n); every run must hold the same prompts in the same order
    (checked; ``PromptMismatchError`` otherwise), which is what makes the paired tests valid.
    """

    arm: str  # "baseline", "sft", "sft_grit", "dpo", "dpo_grit", "cita", "cita_grit", extras
    seed: int
    method: Literal["baseline", "sft", "dpo", "cita"]
    optimizer: Literal["adamw", "grit"] | None
    placement: Literal["none", "system", "prepend"]
    overrides: dict[str, Any]  # per-arm config overrides, e.g. {"optimizer.lr": 1e-4}
    train: TrainInfo | None  # None for the untrained baseline
    metrics_path: str | None  # metrics.jsonl: one JSON object per logged step
    eval: EvalInfo
    embeddings_path: str | None


ARM_ORDER = ("baseline", "sft", "sft_grit", "dpo", "dpo_grit", "cita", "cita_grit")
BASE_METHODS = ("sft", "dpo", "cita")
BASELINE = "baseline"
Run = tuple[str, int]  # (arm, seed)


class PromptMismatchError(ValueError):
    """Two runs' embeddings are not the same prompts in the same order (paired tests need that)."""


# --------------------------------------------------------------------------- grouping and loading


def group_by_arm(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[int, dict]]:
    """``{arm: {seed: record}}`` in the study's arm order (extras after, in order of appearance)."""
    grouped: dict[str, dict[int, dict]] = {}
    for record in records:
        for key in ("arm", "seed", "method", "eval"):
            if key not in record:
                raise ValueError(f"record is missing {key!r}: {dict(record)!r}")
        runs = grouped.setdefault(record["arm"], {})
        if record["seed"] in runs:
            raise ValueError(f"two records for arm {record['arm']!r} seed {record['seed']}")
        runs[int(record["seed"])] = dict(record)
    known = [a for a in ARM_ORDER if a in grouped]
    extras = [a for a in grouped if a not in ARM_ORDER]
    return {arm: dict(sorted(grouped[arm].items())) for arm in known + extras}


@dataclass
class Embeddings:
    labels: np.ndarray
    prompt_ids: np.ndarray
    X: dict[Run, np.ndarray]


def load_embeddings(by_arm: Mapping[str, Mapping[int, dict]]) -> Embeddings | None:
    """Load every run's embeddings and check they are the same prompts, in the same order."""
    reference: tuple[Run, dict[str, np.ndarray]] | None = None
    X: dict[Run, np.ndarray] = {}
    for arm, runs in by_arm.items():
        for seed, record in runs.items():
            if not record.get("embeddings_path"):
                continue
            data = _read_npz(record["embeddings_path"], (arm, seed))
            if reference is None:
                reference = ((arm, seed), data)
            else:
                _check_same_prompts(reference, ((arm, seed), data), record["embeddings_path"])
            X[(arm, seed)] = data["X"]
    if reference is None:
        return None
    ref = reference[1]
    return Embeddings(labels=ref["labels"], prompt_ids=ref["prompt_ids"], X=X)


def _read_npz(path: str | Path, run: Run) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        data = {k: np.asarray(npz[k]) for k in ("X", "labels", "prompt_ids")}
    data["labels"] = data["labels"].astype(str)
    data["prompt_ids"] = data["prompt_ids"].astype(str)
    if data["X"].ndim != 2 or data["X"].shape[0] != data["prompt_ids"].shape[0]:
        raise ValueError(f"{path}: X has shape {data['X'].shape} for {data['prompt_ids'].shape[0]} prompt_ids")
    return data


def _check_same_prompts(reference, candidate, path) -> None:
    (ref_run, ref), (run, data) = reference, candidate
    where = f"arm {run[0]!r} seed {run[1]} ({path})"
    against = f"arm {ref_run[0]!r} seed {ref_run[1]}"
    if data["prompt_ids"].shape != ref["prompt_ids"].shape:
        raise PromptMismatchError(
            f"embeddings of {where} have {data['prompt_ids'].size} prompts but {against} has "
            f"{ref['prompt_ids'].size}; every arm must embed the same prompts in the same order")
    differ = np.flatnonzero(data["prompt_ids"] != ref["prompt_ids"])
    if differ.size:
        i = int(differ[0])
        raise PromptMismatchError(
            f"embeddings of {where} do not match {against}: prompt_ids differ at {differ.size} rows, "
            f"first at row {i} ({data['prompt_ids'][i]!r} vs {ref['prompt_ids'][i]!r}); every arm must "
            f"embed the same prompts in the same order")
    if not np.array_equal(data["labels"], ref["labels"]):
        raise PromptMismatchError(f"embeddings of {where} label the same prompts differently from {against}")


# --------------------------------------------------------------------------- paired contrasts


class AqiResamples:
    """AQI of every run on one shared set of prompt resamples, so any contrast of runs is paired.

    ``resample_indices(labels, R, seed)`` is the exact call ``paired_bootstrap_test`` makes, so a
    two-run contrast here reproduces that test bit for bit (tested).
    """

    def __init__(self, emb: Embeddings, stat: AqiStat, n_resamples: int, seed: int):
        self.emb, self.stat = emb, stat
        self.idx = resample_indices(emb.labels, n_resamples, seed)
        self._estimates: dict[Run, float] = {}
        self._samples: dict[Run, np.ndarray] = {}

    def has(self, run: Run) -> bool:
        return run in self.emb.X

    def estimate(self, run: Run) -> float:
        if run not in self._estimates:
            self._estimates[run] = float(self.stat(self.emb.X[run], self.emb.labels))
        return self._estimates[run]

    def samples(self, run: Run) -> np.ndarray:
        if run not in self._samples:
            self._samples[run] = evaluate_on_resamples(self.stat, self.emb.X[run], self.emb.labels, self.idx)
        return self._samples[run]


SeedPlan = list[tuple[int, dict[str, int]]]  # [(seed label, {arm: seed of the run used})]


def pair_runs_by_seed(by_arm, arms: Sequence[str]) -> tuple[SeedPlan, str | None]:
    """Runs to compare, one ``(seed, {arm: seed})`` per seed; or a reason the contrast can't be made.

    Trained arms are matched on their common seeds. The untrained baseline does not depend on the
    training seed, so when it has a single run that run is reused against every seed.
    """
    missing = [a for a in arms if a not in by_arm]
    if missing:
        return [], f"not answerable: arm{'s' if len(missing) > 1 else ''} {', '.join(missing)} missing"
    only = {a: next(iter(by_arm[a])) for a in arms}
    reused = {a for a in arms if len(by_arm[a]) == 1 and _is_untrained(by_arm[a])}
    matched = [a for a in arms if a not in reused]
    if not matched:
        return [(only[arms[0]], only)], None
    common = sorted(set.intersection(*(set(by_arm[a]) for a in matched)))
    if not common:
        return [], f"not answerable: arms {', '.join(matched)} share no seed"
    return [(s, {a: (only[a] if a in reused else s) for a in arms}) for s in common], None


def _is_untrained(runs: Mapping[int, dict]) -> bool:
    return all(r["method"] == "baseline" or not r.get("train") for r in runs.values())


def _not_answerable(comparison: str, metric: str, reason: str) -> dict[str, Any]:
    return {"comparison": comparison, "metric": metric, "answerable": False, "reason": reason}


def combine_over_seeds(
    estimates: np.ndarray, samples: np.ndarray, alpha: float, method: str, rng: np.random.Generator
) -> dict[str, Any]:
    """Mean of per-seed contrasts with a two-stage bootstrap: seeds resampled, then prompts.

    ``samples`` is (k seeds x R prompt resamples). With one seed this is just that seed's
    bootstrap. Interval and p-value come from stats.py's helpers, so they invert each other.
    """
    k, n_resamples = samples.shape
    if k == 1:
        combined = samples[0]
    else:
        picks = rng.integers(0, k, size=(n_resamples, k))
        combined = samples[picks, np.arange(n_resamples)[:, None]].mean(axis=1)
    estimate = float(np.mean(estimates))
    low, high = _interval(combined, estimate, alpha, method)
    threshold = 2 * estimate if method == "basic" else 0.0
    return {"estimate": estimate, "low": float(low), "high": float(high),
            "p_value": _two_sided_bootstrap_p(combined, threshold)}


def _finish(result: dict[str, Any], plan: SeedPlan, estimates, comparison, metric, alpha, method) -> dict[str, Any]:
    seeds = [label for label, _ in plan]
    low, high = result["low"], result["high"]
    return {
        "comparison": comparison, "metric": metric, "answerable": True, **result,
        "significant": bool(np.isfinite(low) and np.isfinite(high) and not (low <= 0.0 <= high)),
        "alpha": alpha, "n_seeds": len(plan),
        "per_seed": {str(s): float(v) for s, v in zip(seeds, estimates)},
        "seed_sd": float(np.std(estimates, ddof=1)) if len(estimates) > 1 else None,
        "method": method,
    }


def aqi_contrast(ctx: "StudyContext", terms: Mapping[str, float], comparison: str) -> dict[str, Any]:
    """Σ w·AQI over arms (e.g. {a: 1, b: -1}), paired on the same prompt resamples."""
    plan, reason = pair_runs_by_seed(ctx.by_arm, list(terms))
    if reason:
        return _not_answerable(comparison, "AQI", reason)
    if ctx.aqi is None:
        return _not_answerable(comparison, "AQI", "not answerable: no embeddings in the records")
    lacking = list(dict.fromkeys(f"{a} seed {s}" for _, p in plan for a, s in p.items() if not ctx.aqi.has((a, s))))
    if lacking:
        return _not_answerable(comparison, "AQI", f"not answerable: no embeddings for {', '.join(lacking)}")
    if len(plan) == 1 and _is_simple_pair(terms):
        return _single_seed_pair(ctx, plan, terms, comparison)
    estimates = np.array([sum(w * ctx.aqi.estimate((a, p[a])) for a, w in terms.items()) for _, p in plan])
    samples = np.stack([sum(w * ctx.aqi.samples((a, p[a])) for a, w in terms.items()) for _, p in plan])
    result = combine_over_seeds(estimates, samples, ctx.alpha, "basic", np.random.default_rng(ctx.seed + 1))
    method = ("paired basic bootstrap over prompts" if len(plan) == 1
              else "two-stage bootstrap: seeds, then prompts (paired), basic interval")
    return _finish(result, plan, estimates, comparison, "AQI", ctx.alpha, method)


def _is_simple_pair(terms: Mapping[str, float]) -> bool:
    return sorted(terms.values()) == [-1.0, 1.0]


def _single_seed_pair(ctx, plan: SeedPlan, terms, comparison) -> dict[str, Any]:
    runs = plan[0][1]
    a = next(arm for arm, w in terms.items() if w > 0)
    b = next(arm for arm, w in terms.items() if w < 0)
    test = paired_bootstrap_test(ctx.aqi.stat, ctx.aqi.emb.X[(a, runs[a])], ctx.aqi.emb.X[(b, runs[b])],
                                 ctx.aqi.emb.labels, ctx.n_resamples, ctx.seed, ctx.alpha)
    result = {"estimate": test["diff"], "low": test["low"], "high": test["high"], "p_value": test["p_value"]}
    return _finish(result, plan, np.array([test["diff"]]), comparison, "AQI", ctx.alpha, test["method"])


def rate_contrast(ctx: "StudyContext", key: str, terms: Mapping[str, float], comparison: str) -> dict[str, Any]:
    """Σ w·rate for a refusal metric. The records hold rates and counts, not per-prompt outcomes, so
    this cannot pair prompts: each run's rate is redrawn as Binomial(n, rate)/n (what
    ``proportion_bootstrap_ci`` draws), independently per run. When the arms' refusals on the same
    prompts are positively correlated this overstates the variance (conservative)."""
    metric = {"refusal_unsafe": "refusal rate (unsafe)", "over_refusal_safe": "over-refusal (safe)"}[key]
    plan, reason = pair_runs_by_seed(ctx.by_arm, list(terms))
    if reason:
        return _not_answerable(comparison, metric, reason)
    entries = {(a, p[a]): (ctx.by_arm[a][p[a]]["eval"] or {}).get(key) for _, p in plan for a in terms}
    lacking = [f"{a} seed {s}" for (a, s), e in entries.items()
               if not e or e.get("rate") is None or not e.get("n")]
    if lacking:
        return _not_answerable(comparison, metric, f"not answerable: no {metric} for {', '.join(lacking)}")
    estimates = np.array([sum(w * entries[(a, p[a])]["rate"] for a, w in terms.items()) for _, p in plan])
    samples = np.stack([sum(w * _rate_draws(ctx, a, p[a], entries[(a, p[a])]) for a, w in terms.items())
                        for _, p in plan])
    result = combine_over_seeds(estimates, samples, ctx.alpha, "percentile", np.random.default_rng(ctx.seed + 2))
    method = "unpaired binomial bootstrap (per-prompt outcomes not recorded; conservative)"
    if len(plan) > 1:
        method += ", seeds resampled"
    return _finish(result, plan, estimates, comparison, metric, ctx.alpha, method)


def _rate_draws(ctx, arm: str, seed: int, entry: Mapping[str, Any]) -> np.ndarray:
    rng = np.random.default_rng([ctx.seed, zlib.crc32(arm.encode()), seed & 0xFFFFFFFF])
    return rng.binomial(int(entry["n"]), float(entry["rate"]), size=ctx.n_resamples) / int(entry["n"])


# --------------------------------------------------------------------------- context


@dataclass
class StudyContext:
    by_arm: dict[str, dict[int, dict]]
    aqi: AqiResamples | None
    n_resamples: int
    seed: int
    alpha: float

    @property
    def arms(self) -> list[str]:
        return list(self.by_arm)

    @property
    def max_seeds(self) -> int:
        return max(len(runs) for runs in self.by_arm.values())


# --------------------------------------------------------------------------- table rows

CSV_COLUMNS = [
    "arm", "method", "optimizer", "placement", "n_seeds", "seeds", "ci_over",
    "aqi", "aqi_sd", "aqi_low", "aqi_high",
    "delta_aqi", "delta_aqi_low", "delta_aqi_high", "delta_aqi_p", "delta_aqi_significant",
    "probe_auroc", "probe_auroc_low", "probe_auroc_high",
    "refusal_unsafe", "refusal_unsafe_sd", "refusal_unsafe_low", "refusal_unsafe_high",
    "over_refusal_safe", "over_refusal_safe_sd", "over_refusal_safe_low", "over_refusal_safe_high",
    "benign_ppl", "benign_ppl_sd", "benign_kl", "collapsed",
    "train_minutes", "train_minutes_sd", "peak_vram_gib", "tokens_per_s",
    "compute_hours", "compute_device", "efficiency", "efficiency_low", "efficiency_high", "efficiency_unit",
    "overrides",
]


def summarize_over_seeds(values: Sequence[float | None], run_ci: tuple[float, float] | None, alpha: float,
                         bounds: tuple[float, float] | None = None):
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


def _interval_of(runs: Sequence[dict], key: str, value_key: str, alpha: float):
    entries = [(r["eval"] or {}).get(key) for r in runs]
    values = [e.get(value_key) if e else None for e in entries]
    single = entries[0] if len(entries) == 1 and entries[0] else None
    run_ci = (single.get("low"), single.get("high")) if single else None
    rate = key in ("refusal_unsafe", "over_refusal_safe")
    return summarize_over_seeds(values, run_ci, alpha, bounds=(0.0, 1.0) if rate else None)


def _scalar_of(runs: Sequence[dict], key: str) -> tuple[float | None, float | None]:
    vals = [(r["eval"] or {}).get(key) for r in runs]
    vals = [float(v) for v in vals if v is not None]
    if not vals:
        return None, None
    return float(np.mean(vals)), (float(np.std(vals, ddof=1)) if len(vals) > 1 else None)


def _collapse_flag(runs: Sequence[dict]) -> str | None:
    flags = [(r["eval"] or {}).get("collapsed") for r in runs]
    known = [bool(f) for f in flags if f is not None]
    if not known:
        return None
    hits = sum(known)
    if len(known) == 1:
        return "yes" if hits else "no"
    return f"yes ({hits}/{len(known)} seeds)" if hits else "no"


def _training_summary(runs: Sequence[dict]) -> dict[str, Any]:
    trains = [r["train"] for r in runs if r.get("train")]
    if not trains:
        return {"train_minutes": None, "train_minutes_sd": None, "peak_vram_gib": None, "tokens_per_s": None,
                "compute_hours": None, "compute_device": None}
    minutes = [t["train_seconds"] / 60 for t in trains]
    # k workers sharing one device each get about 1/k of it, so a run's device-hours are its wall time / k
    hours = [t["train_seconds"] * t.get("num_processes", 1) / (t.get("device_shared_by") or 1) / 3600 for t in trains]
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
    return {"efficiency": delta["estimate"] / hours, "efficiency_low": delta["low"] / hours,
            "efficiency_high": delta["high"] / hours, "efficiency_unit": f"ΔAQI per {device}-hour"}


def _format_overrides(runs: Sequence[dict]) -> str:
    variants = []
    for r in runs:
        text = "; ".join(f"{k}={v}" for k, v in sorted((r.get("overrides") or {}).items()))
        if text not in variants:
            variants.append(text)
    return " | ".join(v or "—" for v in variants) if len(variants) > 1 else variants[0]


def arm_row(ctx: StudyContext, arm: str) -> dict[str, Any]:
    runs = list(ctx.by_arm[arm].values())
    first = runs[0]
    delta = (aqi_contrast(ctx, {arm: 1.0, BASELINE: -1.0}, f"{arm} − baseline")
             if arm != BASELINE else {"answerable": False, "reason": "reference arm"})
    row: dict[str, Any] = {
        "arm": arm, "method": first["method"], "optimizer": first.get("optimizer"),
        "placement": first.get("placement"), "n_seeds": len(runs),
        "seeds": " ".join(str(s) for s in ctx.by_arm[arm]),
        "ci_over": "prompts (run bootstrap)" if len(runs) == 1 else "seeds (t-interval)",
    }
    aqi = _interval_of(runs, "aqi", "value", ctx.alpha)
    row.update(dict(zip(("aqi", "aqi_sd", "aqi_low", "aqi_high"), aqi)))
    auroc = _interval_of(runs, "probe_auroc", "value", ctx.alpha)
    row.update({"probe_auroc": auroc[0], "probe_auroc_low": auroc[2], "probe_auroc_high": auroc[3]})
    row.update(_delta_columns(delta))
    for key in ("refusal_unsafe", "over_refusal_safe"):
        summary = _interval_of(runs, key, "rate", ctx.alpha)
        row.update(dict(zip((key, f"{key}_sd", f"{key}_low", f"{key}_high"), summary)))
    row["benign_ppl"], row["benign_ppl_sd"] = _scalar_of(runs, "benign_ppl")
    row["benign_kl"], _ = _scalar_of(runs, "benign_kl")
    row["collapsed"] = _collapse_flag(runs)
    training = _training_summary(runs)
    row.update(training)
    row.update(_efficiency(delta, training))
    row["overrides"] = _format_overrides(runs)
    return {c: row.get(c) for c in CSV_COLUMNS}


def _delta_columns(delta: dict[str, Any]) -> dict[str, Any]:
    if not delta.get("answerable"):
        return {"delta_aqi": None, "delta_aqi_low": None, "delta_aqi_high": None, "delta_aqi_p": None,
                "delta_aqi_significant": None}
    return {"delta_aqi": delta["estimate"], "delta_aqi_low": delta["low"], "delta_aqi_high": delta["high"],
            "delta_aqi_p": delta["p_value"], "delta_aqi_significant": delta["significant"]}


# --------------------------------------------------------------------------- wording


def _num(x: float | None, digits: int = 3, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def _p(p: float | None) -> str:
    if p is None or not math.isfinite(p):
        return "n/a"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def describe(result: dict[str, Any], higher: str = "", lower: str = "") -> str:
    """One sentence: estimate, CI, p, and an explicit significance verdict (never more than that)."""
    head = f"{result['metric']}, {result['comparison']}"
    if not result.get("answerable"):
        return f"{head}: {result['reason']}"
    alpha = result["alpha"]
    seeds = f"{result['n_seeds']} seed{'s' if result['n_seeds'] > 1 else ''}"
    text = (f"{head} = {_num(result['estimate'], signed=True)} ({1 - alpha:.0%} CI {_num(result['low'], signed=True)} "
            f"to {_num(result['high'], signed=True)}, p = {_p(result['p_value'])}, {seeds}): ")
    if not result["significant"]:
        return text + f"not significant at α={alpha:g} (the CI covers 0)."
    side = higher if result["estimate"] > 0 else lower
    return text + f"significant at α={alpha:g}" + (f"; {side}." if side else ".")


def _finding(result: dict[str, Any], higher: str = "", lower: str = "") -> dict[str, Any]:
    return {**result, "text": describe(result, higher, lower)}


def _question(question: str, findings: list[dict[str, Any]], notes: list[str]) -> dict[str, Any]:
    answerable = [f.get("answerable", True) for f in findings]
    status = ("answered" if answerable and all(answerable)
              else "partly answerable" if any(answerable) else "not answerable")
    return {"question": question, "status": status, "findings": findings, "notes": notes}


def _seed_notes(ctx: StudyContext) -> list[str]:
    if ctx.max_seeds == 1:
        return ["One seed per arm: seed-to-seed variance is not captured; intervals reflect prompt sampling only."]
    return [f"Up to {ctx.max_seeds} seeds per arm: estimates are means of per-seed differences; intervals "
            "resample seeds, then prompts (with few seeds the seed stage understates seed variance)."]


# --------------------------------------------------------------------------- research questions


def _pairwise(ctx, a: str, b: str, include_rates: bool = True) -> list[dict[str, Any]]:
    """AQI (paired) and, optionally, both refusal rates for a − b."""
    label = f"{a} − {b}"
    findings = [_finding(aqi_contrast(ctx, {a: 1.0, b: -1.0}, label), f"{a} higher", f"{b} higher")]
    if include_rates:
        findings.append(_finding(rate_contrast(ctx, "refusal_unsafe", {a: 1.0, b: -1.0}, label),
                                 f"{a} refuses more unsafe prompts", f"{b} refuses more unsafe prompts"))
        findings.append(_finding(rate_contrast(ctx, "over_refusal_safe", {a: 1.0, b: -1.0}, label),
                                 f"{a} over-refuses more", f"{b} over-refuses more"))
    return findings


def placement_pairs(ctx: StudyContext) -> list[tuple[str, str]]:
    """Arm pairs that differ only by instruction placement (same method, optimizer and overrides).

    Ordered (more instruction, less): an instructed arm before ``none``; ``prepend`` before ``system``.
    """
    rank = {"prepend": 2, "system": 1, "none": 0}
    info = {a: next(iter(runs.values())) for a, runs in ctx.by_arm.items() if a != BASELINE}
    pairs = []
    arms = list(info)
    for i, a in enumerate(arms):
        for b in arms[i + 1:]:
            ra, rb = info[a], info[b]
            same = (ra["method"] == rb["method"] and ra.get("optimizer") == rb.get("optimizer")
                    and (ra.get("overrides") or {}) == (rb.get("overrides") or {}))
            if same and ra.get("placement") != rb.get("placement"):
                hi, lo = (a, b) if rank.get(ra.get("placement"), 0) >= rank.get(rb.get("placement"), 0) else (b, a)
                pairs.append((hi, lo))
    return pairs


def answer_q1(ctx: StudyContext) -> dict[str, Any]:
    findings = _pairwise(ctx, "cita", "dpo")
    notes = ["CITA vs DPO changes the loss (KL anchor) as well as the instruction, so it is the method "
             "effect, not the instruction alone."]
    if "cita_grit" in ctx.by_arm and "dpo_grit" in ctx.by_arm:
        findings += _pairwise(ctx, "cita_grit", "dpo_grit", include_rates=False)
    pairs = placement_pairs(ctx)
    for hi, lo in pairs:
        findings += _pairwise(ctx, hi, lo)
    if pairs:
        notes.append("Instruction factor alone: " + ", ".join(
            f"{hi} ({_placement(ctx, hi)}) vs {lo} ({_placement(ctx, lo)})" for hi, lo in pairs) + ".")
    else:
        notes.append("No arms differ only by instruction placement (e.g. dpo vs dpo_sys, cita vs cita_noinstr): "
                     "the instruction factor alone is not answerable.")
    return _question("Q1: does instruction conditioning help (CITA vs DPO; placement alone)?",
                     findings, notes + _seed_notes(ctx))


def _placement(ctx, arm: str) -> str:
    return str(next(iter(ctx.by_arm[arm].values())).get("placement"))


def answer_q2(ctx: StudyContext) -> dict[str, Any]:
    findings = []
    for base in BASE_METHODS:
        findings += _pairwise(ctx, f"{base}_grit", base)
    return _question("Q2: does GRIT help each base method (X_grit − X)?", findings, _seed_notes(ctx))


def answer_q3(ctx: StudyContext) -> dict[str, Any]:
    combined = _finding(aqi_contrast(ctx, {"cita_grit": 1.0, "dpo": -1.0}, "cita_grit − dpo"),
                        "cita_grit higher", "dpo higher")
    interaction_terms = {"cita_grit": 1.0, "cita": -1.0, "dpo_grit": -1.0, "dpo": 1.0}
    interaction = _finding(aqi_contrast(ctx, interaction_terms, "(cita_grit − cita) − (dpo_grit − dpo)"),
                           "super-additive: GRIT helps CITA more than DPO",
                           "sub-additive: GRIT helps CITA less than DPO")
    notes = ["An interaction CI covering 0 means the data are compatible with additive effects; it does not "
             "show that they are additive."]
    return _question("Q3: do the effects stack (CITA + GRIT)?", [combined, interaction], notes + _seed_notes(ctx))


def answer_q4(ctx: StudyContext, rows: Sequence[dict[str, Any]], q2: dict[str, Any]) -> dict[str, Any]:
    by_arm = {r["arm"]: r for r in rows}
    findings = [_efficiency_finding(r, ctx.alpha) for r in rows if r["arm"] != BASELINE]
    grit_aqi = {f["comparison"]: f for f in q2["findings"] if f["metric"] == "AQI"}
    for base in BASE_METHODS:
        findings.append(_overhead_finding(by_arm, base, grit_aqi.get(f"{base}_grit − {base}"), ctx.alpha))
    notes = ["Compute-hours = train_seconds × num_processes / device_shared_by / 3600 per run (mean over seeds); "
             "evaluation time "
             "is not included. ΔAQI per hour treats the hours as fixed, so its CI is the ΔAQI CI scaled."]
    return _question("Q4: is the cost justified (ΔAQI per GPU-hour, GRIT overhead)?",
                     findings, notes + _seed_notes(ctx))


def _efficiency_finding(row: dict[str, Any], alpha: float) -> dict[str, Any]:
    base = {"comparison": row["arm"], "metric": "ΔAQI per GPU-hour"}
    if row["efficiency"] is None:
        reason = "no ΔAQI vs baseline" if row["delta_aqi"] is None else "no training time recorded"
        return {**base, "answerable": False, "reason": f"not answerable: {reason}",
                "text": f"{row['arm']}: ΔAQI per GPU-hour not answerable ({reason})."}
    cost = f"ΔAQI {_num(row['delta_aqi'], signed=True)} over {_num(row['compute_hours'], 3)} {row['compute_device']}-h"
    eff = (f"{_num(row['efficiency'], signed=True)} (CI {_num(row['efficiency_low'], signed=True)} to "
           f"{_num(row['efficiency_high'], signed=True)})")
    if row["compute_device"] == "CPU":
        text = f"{row['arm']}: ΔAQI per GPU-hour n/a (CPU); per CPU-hour {eff} ({cost})."
    else:
        text = f"{row['arm']}: ΔAQI per GPU-hour {eff} ({cost})."
    if not row["delta_aqi_significant"]:
        text += f" ΔAQI itself is not significant at α={alpha:g}, so neither is this rate."
    return {**base, "answerable": True, "estimate": row["efficiency"], "low": row["efficiency_low"],
            "high": row["efficiency_high"], "unit": row["efficiency_unit"], "text": text}


def _overhead_finding(by_arm, base: str, grit_effect: dict | None, alpha: float) -> dict[str, Any]:
    grit = f"{base}_grit"
    head = {"comparison": f"{grit} vs {base}", "metric": "GRIT time overhead"}
    missing = [a for a in (base, grit) if a not in by_arm]
    if missing:
        reason = f"not answerable: arm {', '.join(missing)} missing"
        return {**head, "answerable": False, "reason": reason, "text": f"GRIT overhead for {base}: {reason}."}
    plain, with_grit = by_arm[base], by_arm[grit]
    if not plain["train_minutes"] or with_grit["train_minutes"] is None:
        reason = "not answerable: training time missing"
        return {**head, "answerable": False, "reason": reason, "text": f"GRIT overhead for {base}: {reason}."}
    ratio = with_grit["train_minutes"] / plain["train_minutes"]
    extra_hours = with_grit["compute_hours"] - plain["compute_hours"]
    vram = (with_grit["peak_vram_gib"] - plain["peak_vram_gib"]
            if with_grit["peak_vram_gib"] is not None and plain["peak_vram_gib"] is not None else None)
    extra_minutes = with_grit["train_minutes"] - plain["train_minutes"]
    text = (f"GRIT on {base}: training time ×{ratio:.2f} ({_num(extra_minutes, 1, True)} "
            f"min per run, {_num(extra_hours, 3, True)} {plain['compute_device']}-h), peak VRAM "
            f"{_num(vram, 2, True) + ' GiB' if vram is not None else 'n/a'}. ")
    text += _cost_verdict(grit_effect, extra_hours, alpha)
    return {**head, "answerable": True, "time_ratio": ratio, "extra_compute_hours": extra_hours,
            "extra_peak_vram_gib": vram, "text": text}


def _cost_verdict(effect: dict | None, extra_hours: float, alpha: float) -> str:
    if not effect or not effect.get("answerable"):
        return "GRIT's AQI effect is not answerable, so the cost cannot be weighed."
    est = _num(effect["estimate"], signed=True)
    if not effect["significant"]:
        return (f"Its AQI effect ({est}) is not significant at α={alpha:g}: the extra compute buys no AQI gain "
                "distinguishable from zero.")
    if effect["estimate"] < 0:
        return f"Its AQI effect ({est}) is significantly negative: the extra compute lowers AQI."
    if extra_hours > 0:
        per_hour = _num(effect["estimate"] / extra_hours, 3, True)
        return (f"Its AQI gain ({est}) is significant at α={alpha:g}: {per_hour} "
                "AQI per extra compute-hour; whether that is worth it depends on the budget.")
    return f"Its AQI gain ({est}) is significant at α={alpha:g} and it costs no extra time."


# --------------------------------------------------------------------------- consistency notes


def consistency_notes(ctx: StudyContext, tolerance: float = 1e-4) -> list[str]:
    """Flag runs whose recorded AQI differs from AqiStat on their embeddings (different settings?)."""
    if ctx.aqi is None:
        return ["No embeddings in the records: ΔAQI and the paired AQI tests are not available."]
    notes = []
    for arm, runs in ctx.by_arm.items():
        for seed, record in runs.items():
            recorded = ((record["eval"] or {}).get("aqi") or {}).get("value")
            if recorded is None or not ctx.aqi.has((arm, seed)):
                continue
            recomputed = ctx.aqi.estimate((arm, seed))
            if abs(recomputed - recorded) > tolerance:
                notes.append(f"{arm} seed {seed}: recorded AQI {recorded:.4f} ≠ {recomputed:.4f} recomputed from its "
                             "embeddings (different gamma/pca_dim/layer?); ΔAQI and the tests use the "
                             "recomputed value.")
    return notes


# --------------------------------------------------------------------------- training curves


CURVE_METRICS = ("loss", "rewards/margins", "kl")


def read_training_curves(by_arm) -> list[dict[str, Any]]:
    """``[{arm, seed, steps: [...]}]`` from each run's metrics.jsonl (missing files skipped)."""
    curves = []
    for arm, runs in by_arm.items():
        for seed, record in runs.items():
            path = record.get("metrics_path")
            if not path or not Path(path).exists():
                continue
            steps = read_jsonl_tolerant(path)  # a torn last line (killed writer) is dropped
            curves.append({"arm": arm, "seed": seed, "steps": steps})
    return curves


# --------------------------------------------------------------------------- outputs


def _md_cell(row: dict[str, Any], key: str, digits: int = 3) -> str:
    value, low, high, sd = row.get(key), row.get(f"{key}_low"), row.get(f"{key}_high"), row.get(f"{key}_sd")
    if value is None:
        return "n/a"
    text = _num(value, digits)
    if sd is not None:
        text += f" ± {_num(sd, digits)}"
    if low is not None and high is not None:
        text += f" [{_num(low, digits)}, {_num(high, digits)}]"
    return text


def _md_delta(row: dict[str, Any]) -> str:
    if row["delta_aqi"] is None:
        return "—" if row["arm"] == BASELINE else "n/a"
    mark = "*" if row["delta_aqi_significant"] else ""
    return (f"{_num(row['delta_aqi'], signed=True)}{mark} [{_num(row['delta_aqi_low'], signed=True)}, "
            f"{_num(row['delta_aqi_high'], signed=True)}] p={_p(row['delta_aqi_p'])}")


def _md_efficiency(row: dict[str, Any]) -> str:
    if row["efficiency"] is None:
        return "—" if row["arm"] == BASELINE else "n/a"
    if row["compute_device"] == "CPU":
        return f"n/a (CPU); {_num(row['efficiency'], signed=True)} per CPU-h"
    return _num(row["efficiency"], signed=True)


def _md_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    header = ["arm", "seeds", "AQI", "ΔAQI vs baseline", "refusal (unsafe)", "over-refusal (safe)",
              "benign ppl", "collapsed", "train min", "peak VRAM GiB", "tokens/s", "ΔAQI / GPU-h", "overrides"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, r in enumerate(rows, 1):
        cells = [r["arm"], str(r["n_seeds"]), _md_cell(r, "aqi"), _md_delta(r), _md_cell(r, "refusal_unsafe"),
                 _md_cell(r, "over_refusal_safe"), _num(r["benign_ppl"], 2), r["collapsed"] or "n/a",
                 _num(r["train_minutes"], 1) if r["train_minutes"] is not None else "—",
                 ("n/a (CPU)" if r["compute_device"] == "CPU" else _num(r["peak_vram_gib"], 2))
                 if r["compute_device"] else "—",
                 _num(r["tokens_per_s"], 0) if r["tokens_per_s"] is not None else "—",
                 _md_efficiency(r), r["overrides"] or "—"]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return lines


def render_markdown(rows, questions, settings, notes) -> str:
    alpha = settings["alpha"]
    lines = ["# Ecliptica study results", "",
             f"{settings['n_prompts'] or 'n/a'} prompts · {settings['n_resamples']} bootstrap resamples · "
             f"α = {alpha:g} · seed {settings['seed']}", "", *_md_table(rows), "",
             f"Cells: mean [{1 - alpha:.0%} CI]; with several seeds mean ± sd [t-interval over seeds]; with one "
             "seed the run's own bootstrap CI over prompts. ΔAQI: paired bootstrap on the same prompts "
             f"(AqiStat); * = CI excludes 0 (significant at α={alpha:g}). Compute-hours = train_seconds × "
             "num_processes / device_shared_by / 3600; CPU runs are labelled and their rate is per CPU-hour. Overrides are the "
             "per-arm config changes.", ""]
    if notes:
        lines += ["Notes:", *[f"- {n}" for n in notes], ""]
    lines += ["## Research questions", ""]
    for q in questions.values():
        lines += [f"### {q['question']}", "", f"Status: {q['status']}.", ""]
        lines += [f"- {f['text']}" for f in q["findings"]]
        lines += [""] + [f"_{n}_" for n in q["notes"]] + [""]
    return "\n".join(lines)


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    f = io.StringIO(newline="")
    writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row[k] is None else row[k] for k in CSV_COLUMNS})
    atomic_write_text(path, f.getvalue())


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


# --------------------------------------------------------------------------- figures


def make_figures(ctx: StudyContext, rows, questions, fig_dir: Path) -> dict[str, dict[str, str]]:
    from ecliptica.study import figures as F

    grit = [f for f in questions["Q2"]["findings"] if f["metric"] == "AQI"]
    best, base = _cluster_pair(ctx, rows)
    return {
        "fig1_aqi_by_method": F.aqi_by_arm(rows, fig_dir / "fig1_aqi_by_method"),
        "fig2_delta_aqi_vs_baseline": F.delta_aqi(rows, fig_dir / "fig2_delta_aqi_vs_baseline"),
        "fig3_grit_effect": F.grit_effect(grit, fig_dir / "fig3_grit_effect"),
        "fig4_method_pairs": F.method_pairs(rows, fig_dir / "fig4_method_pairs"),
        "fig5_efficiency": F.efficiency(rows, fig_dir / "fig5_efficiency"),
        "fig6_clusters_3d": F.clusters_3d(best, base, ctx.aqi.emb.labels if ctx.aqi else None,
                                          fig_dir / "fig6_clusters_3d"),
        "training_curves": F.training_curves(read_training_curves(ctx.by_arm), CURVE_METRICS,
                                             fig_dir / "training_curves"),
    }


def _cluster_pair(ctx: StudyContext, rows):
    """(name, X) of the best non-baseline arm by AQI and of the baseline (their first seed with embeddings)."""
    if ctx.aqi is None:
        return None, None

    def first_embedded(arm):
        seed = next((s for s in ctx.by_arm.get(arm, {}) if ctx.aqi.has((arm, s))), None)
        return None if seed is None else (f"{arm} (seed {seed})", ctx.aqi.emb.X[(arm, seed)])

    ranked = sorted((r for r in rows if r["arm"] != BASELINE and r["aqi"] is not None), key=lambda r: -r["aqi"])
    best = next((e for r in ranked if (e := first_embedded(r["arm"])) is not None), None)
    return best, first_embedded(BASELINE)


# --------------------------------------------------------------------------- entry point


def build_report(
    records: Sequence[Mapping[str, Any]],
    out_dir: str | Path,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    aqi_stat: AqiStat | None = None,
    figures: bool = True,
) -> dict[str, Any]:
    """Write results.md/.csv/.json and figures/ for the study; return paths, rows and answers.

    ``aqi_stat`` (default ``AqiStat()``: gamma 0.5, no PCA) must match the settings the evaluation
    used for the recorded AQI; a mismatch is reported in the notes. ``figures=False`` skips the
    plots (the slow part) for quick re-reads of the numbers.
    """
    if not records:
        raise ValueError("no records to report on")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    by_arm = group_by_arm(records)
    emb = load_embeddings(by_arm)
    aqi = AqiResamples(emb, aqi_stat or AqiStat(), n_resamples, seed) if emb is not None else None
    ctx = StudyContext(by_arm, aqi, n_resamples, seed, alpha)

    rows = [arm_row(ctx, arm) for arm in ctx.arms]
    q2 = answer_q2(ctx)
    questions = {"Q1": answer_q1(ctx), "Q2": q2, "Q3": answer_q3(ctx), "Q4": answer_q4(ctx, rows, q2)}
    notes = consistency_notes(ctx)
    shared = sorted({(r.get("train") or {}).get("device_shared_by") or 1 for r in records} - {1})
    if shared:
        notes.append(f"Runs trained while {' or '.join(map(str, shared))} study workers shared each device: train "
                     "minutes and tokens/s are wall-clock under that sharing (comparable between arms of this study, "
                     "not standalone speeds), and device-hours are wall time divided by the number of workers sharing it.")
    if BASELINE not in by_arm:
        notes.append("No baseline arm: ΔAQI and efficiency are not answerable.")
    settings = {"n_resamples": n_resamples, "seed": seed, "alpha": alpha,
                "n_prompts": int(emb.labels.size) if emb is not None else None,
                "aqi": {"gamma": (aqi_stat or AqiStat()).gamma, "pca_dim": (aqi_stat or AqiStat()).pca_dim},
                "arms": ctx.arms, "seeds": {a: list(r) for a, r in by_arm.items()}}

    figure_paths = make_figures(ctx, rows, questions, out / "figures") if figures else {}
    paths = {"results_md": out / "results.md", "results_csv": out / "results.csv", "results_json": out / "results.json"}
    atomic_write_text(paths["results_md"], render_markdown(rows, questions, settings, notes))
    write_csv(rows, paths["results_csv"])
    payload = {"settings": settings, "rows": rows, "questions": questions, "notes": notes, "figures": figure_paths}
    atomic_write_text(paths["results_json"], json.dumps(_jsonable(payload), indent=2, ensure_ascii=False))
    return {**{k: str(v) for k, v in paths.items()}, "figures": figure_paths, "rows": rows,
            "questions": questions, "notes": notes}
