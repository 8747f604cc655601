"""Contrasts of arms, Σ w·metric(arm), with an interval and a p-value; and the decision rules.

AQI contrasts are paired: each run's AQI is the evaluator's statistic (``AqiStat``) with that
run's *recorded* settings (gamma, pca_dim), on one shared set of prompt resamples, so prompt
difficulty cancels (``paired_bootstrap_test`` for two arms and one seed; the same draws plus a seed
stage otherwise). Recomputing a run's AQI from its embeddings must give the recorded value; a
mismatch means the embeddings are not what the evaluator scored and is an error. Without
embeddings (e.g. a committed result that kept only eval.json), AQI contrasts fall back to a
t-interval over seeds of the recorded values. Refusal contrasts draw each run's rate from the
Jeffreys posterior of its recorded count (per-prompt outcomes are not in the summary); an arm's seeds
share their draws' uniforms, because they were scored on the same prompts.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from ecliptica.evaluation.aqi import AqiStat
from ecliptica.evaluation.discriminant import BandAqiStat
from ecliptica.evaluation.stats import (
    bootstrap_interval,
    evaluate_on_resamples,
    paired_bootstrap_test,
    resample_indices,
    two_sided_bootstrap_p,
)

from .records import Embeddings, Run

METRIC_LABELS = {
    "aqi": "AQI",
    "refusal_rate_unsafe": "refusal rate (unsafe)",
    "over_refusal_rate_safe": "over-refusal (safe)",
}
Decision = Literal["different", "equivalent", "inconclusive"]


SEEDS_ONLY = "t-interval over seeds"  # how a contrast without a prompt stage names its method


def has_prompt_stage(result: Mapping[str, Any]) -> bool:
    """Whether an answerable contrast's interval includes prompt sampling (not the seeds-only fallback)."""
    return not result["method"].startswith(SEEDS_ONLY)


class AqiMismatchError(ValueError):
    """A run's embeddings do not reproduce the AQI its evaluation recorded."""


def aqi_stat_of(record: Mapping[str, Any]) -> AqiStat | BandAqiStat:
    """The evaluator's AQI statistic with the settings this run was scored with.

    For the discriminant headline the run's embeddings are its band projections
    (eval/aqi_band_projections.npz): their folds depend on the prompts only, so arms pair.
    """
    s = record["eval"]
    if s.aqi_statistic == "discriminant_band":
        return BandAqiStat(gamma=s.aqi_gamma)
    return AqiStat(gamma=s.aqi_gamma, pca_dim=s.aqi_pca_dim)


def aqi_settings_of(record: Mapping[str, Any]) -> tuple[float, int | None, int]:
    s = record["eval"]
    return (s.aqi_gamma, s.aqi_pca_dim, s.aqi_layer)


class AqiResamples:
    """AQI of every run on one shared set of prompt resamples, so any contrast of runs is paired.

    ``stats`` is one ``AqiStat`` for every run or one per run (each run's recorded settings);
    ``recorded`` (optional) holds each run's AQI as its evaluation recorded it, and recomputing a
    run's AQI must reproduce it. ``resample_indices(labels, R, seed)`` is the exact call
    ``paired_bootstrap_test`` makes, so a two-run contrast here reproduces that test bit for bit.
    """

    def __init__(
        self,
        emb: Embeddings,
        stats: AqiStat | Mapping[Run, AqiStat],
        n_resamples: int,
        seed: int,
        recorded: Mapping[Run, float | None] | None = None,
        tolerance: float = 1e-6,
    ):
        self.emb, self.stats, self.recorded, self.tolerance = emb, stats, recorded or {}, tolerance
        self.idx = resample_indices(emb.labels, n_resamples, seed)
        self._estimates: dict[Run, float] = {}
        self._samples: dict[Run, np.ndarray] = {}

    def has(self, run: Run) -> bool:
        return run in self.emb.X

    def stat(self, run: Run) -> AqiStat:
        return self.stats if isinstance(self.stats, AqiStat) else self.stats[run]

    def estimate(self, run: Run) -> float:
        if run not in self._estimates:
            stat = self.stat(run)
            value = float(stat(self.emb.X[run], self.emb.labels))
            recorded = self.recorded.get(run)
            if recorded is not None and abs(value - recorded) > self.tolerance:
                raise AqiMismatchError(
                    f"arm {run[0]!r} seed {run[1]}: AQI from its embeddings with the recorded settings "
                    f"(gamma={stat.gamma}, pca_dim={stat.pca_dim}) is {value:.6f} but its evaluation recorded "
                    f"{recorded:.6f}: these are not the embeddings the evaluator scored"
                )
            self._estimates[run] = value
        return self._estimates[run]

    def samples(self, run: Run) -> np.ndarray:
        if run not in self._samples:
            self._samples[run] = evaluate_on_resamples(self.stat(run), self.emb.X[run], self.emb.labels, self.idx)
        return self._samples[run]


def aqi_resamples(
    emb: Embeddings, by_arm: Mapping[str, Mapping[int, dict]], n_resamples: int, seed: int
) -> AqiResamples:
    """Resamples for a study: each run scored with its recorded settings and checked against its AQI."""
    runs = [(a, s) for a, by_seed in by_arm.items() for s in by_seed]
    return AqiResamples(
        emb,
        {r: aqi_stat_of(by_arm[r[0]][r[1]]) for r in runs},
        n_resamples,
        seed,
        recorded={r: by_arm[r[0]][r[1]]["eval"].aqi.value for r in runs},
    )


@dataclass
class StudyContext:
    by_arm: dict[str, dict[int, dict]]
    aqi: AqiResamples | None
    n_resamples: int
    seed: int
    alpha: float
    _cache: dict[Any, dict[str, Any]] = field(default_factory=dict, repr=False)

    @property
    def arms(self) -> list[str]:
        return list(self.by_arm)

    @property
    def max_seeds(self) -> int:
        return max(len(runs) for runs in self.by_arm.values())


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


def not_answerable(comparison: str, metric: str, reason: str) -> dict[str, Any]:
    return {"comparison": comparison, "metric": metric, "answerable": False, "reason": reason}


def combine_over_seeds(
    estimates: np.ndarray, samples: np.ndarray, alpha: float, method: str, rng: np.random.Generator
) -> dict[str, Any]:
    """Mean of per-seed contrasts with a two-stage bootstrap: seeds resampled, then prompts.

    ``samples`` is (k seeds x R prompt resamples). With one seed this is just that seed's
    bootstrap. Interval and p-value come from stats.py, so they invert each other.
    """
    k, n_resamples = samples.shape
    if k == 1:
        combined = samples[0]
    else:
        picks = rng.integers(0, k, size=(n_resamples, k))
        combined = samples[picks, np.arange(n_resamples)[:, None]].mean(axis=1)
    estimate = float(np.mean(estimates))
    low, high = bootstrap_interval(combined, estimate, alpha, method)
    threshold = 2 * estimate if method == "basic" else 0.0
    return {
        "estimate": estimate,
        "low": float(low),
        "high": float(high),
        "p_value": two_sided_bootstrap_p(combined, threshold),
    }


def t_over_seeds(estimates: np.ndarray, alpha: float) -> dict[str, Any]:
    """Mean of per-seed contrasts, t-interval over seeds and the two-sided one-sample t-test p."""
    from scipy import stats

    k = estimates.size
    mean, sd = float(estimates.mean()), float(estimates.std(ddof=1))
    if sd == 0.0:  # a t-test needs spread: p would be 0 (or 1) from nothing; the caller says why it can't answer
        raise ValueError("t_over_seeds: every seed gives the same value; there is no spread to test against")
    se = sd / math.sqrt(k)
    half = float(stats.t.ppf(1 - alpha / 2, k - 1)) * se
    p = float(2 * stats.t.sf(abs(mean) / se, k - 1))
    return {"estimate": mean, "low": mean - half, "high": mean + half, "p_value": p}


def _finish(result: dict[str, Any], plan: SeedPlan, estimates, comparison, metric, alpha, method) -> dict[str, Any]:
    seeds = [label for label, _ in plan]
    low, high = result["low"], result["high"]
    signs = {int(np.sign(v)) for v in estimates if v != 0}
    return {
        "comparison": comparison,
        "metric": metric,
        "answerable": True,
        **result,
        "significant": bool(np.isfinite(low) and np.isfinite(high) and not (low <= 0.0 <= high)),
        "alpha": alpha,
        "n_seeds": len(plan),
        "per_seed": {str(s): float(v) for s, v in zip(seeds, estimates)},
        "seed_sd": float(np.std(estimates, ddof=1)) if len(estimates) > 1 else None,
        "seeds_disagree": len(signs) > 1,
        "method": method,
    }


def contrast(ctx: StudyContext, metric: str, terms: Mapping[str, float], comparison: str) -> dict[str, Any]:
    """One metric's contrast (memoised: the same contrast in two questions is computed once)."""
    key = (metric, tuple(sorted(terms.items())))
    if key not in ctx._cache:
        compute = aqi_contrast if metric == "aqi" else lambda c, t, n: rate_contrast(c, metric, t, n)
        ctx._cache[key] = compute(ctx, terms, comparison)
    return {**ctx._cache[key], "comparison": comparison}


def aqi_contrast(ctx: StudyContext, terms: Mapping[str, float], comparison: str) -> dict[str, Any]:
    """Σ w·AQI over arms (e.g. {a: 1, b: -1}), paired on the same prompt resamples."""
    plan, reason = pair_runs_by_seed(ctx.by_arm, list(terms))
    if reason:
        return not_answerable(comparison, "AQI", reason)
    runs = [(a, p[a]) for _, p in plan for a in terms]
    settings = {aqi_settings_of(ctx.by_arm[a][s]) for a, s in runs}
    if len(settings) > 1:
        described = "; ".join(f"gamma={g}, pca_dim={d}, layer={layer}" for g, d, layer in sorted(settings, key=str))
        return not_answerable(comparison, "AQI", f"not answerable: the runs' AQI settings differ ({described})")
    if ctx.aqi is not None and all(ctx.aqi.has(r) for r in runs):
        return _paired_aqi(ctx, plan, terms, comparison)
    if len(plan) > 1:
        estimates = np.array(
            [sum(w * ctx.by_arm[a][p[a]]["eval"].aqi.value for a, w in terms.items()) for _, p in plan]
        )
        if np.ptp(estimates) == 0.0:  # e.g. two untrained arms: no seed spread and no prompt-level data to test
            return not_answerable(
                comparison,
                "AQI",
                f"not answerable: every seed gives the same contrast "
                f"({estimates[0]:+.4g}) and without embeddings there is no prompt-level "
                "uncertainty to test it against",
            )
        return _finish(
            t_over_seeds(estimates, ctx.alpha),
            plan,
            estimates,
            comparison,
            "AQI",
            ctx.alpha,
            SEEDS_ONLY + " of the recorded AQI (no embeddings: prompt sampling not included)",
        )
    lacking = list(dict.fromkeys(f"{a} seed {s}" for a, s in runs if ctx.aqi is None or not ctx.aqi.has((a, s))))
    return not_answerable(comparison, "AQI", f"not answerable: no embeddings for {', '.join(lacking)} and one seed")


def _paired_aqi(ctx: StudyContext, plan: SeedPlan, terms, comparison) -> dict[str, Any]:
    if len(plan) == 1 and sorted(terms.values()) == [-1.0, 1.0]:
        runs = plan[0][1]
        a = next(arm for arm, w in terms.items() if w > 0)
        b = next(arm for arm, w in terms.items() if w < 0)
        ctx.aqi.estimate((a, runs[a])), ctx.aqi.estimate((b, runs[b]))  # checks both against the recorded AQI
        test = paired_bootstrap_test(
            ctx.aqi.stat((a, runs[a])),
            ctx.aqi.emb.X[(a, runs[a])],
            ctx.aqi.emb.X[(b, runs[b])],
            ctx.aqi.emb.labels,
            ctx.n_resamples,
            ctx.seed,
            ctx.alpha,
        )
        result = {"estimate": test["diff"], "low": test["low"], "high": test["high"], "p_value": test["p_value"]}
        return _finish(result, plan, np.array([test["diff"]]), comparison, "AQI", ctx.alpha, test["method"])
    estimates = np.array([sum(w * ctx.aqi.estimate((a, p[a])) for a, w in terms.items()) for _, p in plan])
    samples = np.stack([sum(w * ctx.aqi.samples((a, p[a])) for a, w in terms.items()) for _, p in plan])
    result = combine_over_seeds(estimates, samples, ctx.alpha, "basic", np.random.default_rng(ctx.seed + 1))
    method = (
        "paired basic bootstrap over prompts"
        if len(plan) == 1
        else "two-stage bootstrap: seeds, then prompts (paired), basic interval"
    )
    return _finish(result, plan, estimates, comparison, "AQI", ctx.alpha, method)


def rate_contrast(ctx: StudyContext, key: str, terms: Mapping[str, float], comparison: str) -> dict[str, Any]:
    """Σ w·rate for a refusal metric. The summary holds rates and counts, not per-prompt outcomes, so
    this cannot pair prompts: each run's rate is drawn from Beta(k + 1/2, n - k + 1/2) (Jeffreys).

    Arms are drawn independently. When the arms' refusals on the same prompts are positively correlated
    this overstates the variance (conservative). An arm's seeds share one uniform per draw (each seed's
    rate is the same quantile of its own posterior): every seed was scored on the *same* prompts, so their
    prompt-sampling errors are not independent and do not average out over seeds. Independent draws per
    seed shrank that error by ~sqrt(seeds): an untrained arm (three identical seeds) got a third of a
    run's variance. The shared uniform is the most correlated coupling, so again conservative.

    Why not the plug-in Binomial(n, k/n)/n redraw: at k = 0 or k = n it has no spread at all, so two arms
    that each refused 0 of 8 prompts got the interval [0, 0] and an "equivalent" verdict; near 0 its
    interval of a difference covered the truth in ~80% of simulated studies, not 95%
    (tests/study/test_statistics.py)."""
    metric = METRIC_LABELS[key]
    plan, reason = pair_runs_by_seed(ctx.by_arm, list(terms))
    if reason:
        return not_answerable(comparison, metric, reason)
    entries = {(a, p[a]): getattr(ctx.by_arm[a][p[a]]["eval"], key) for _, p in plan for a in terms}
    lacking = [f"{a} seed {s}" for (a, s), e in entries.items() if e is None or not e.n]
    if lacking:
        return not_answerable(comparison, metric, f"not answerable: no {metric} for {', '.join(lacking)}")
    estimates = np.array([sum(w * entries[(a, p[a])].rate for a, w in terms.items()) for _, p in plan])
    uniforms = {a: _arm_uniforms(ctx, a, key) for a in terms}
    samples = np.stack(
        [sum(w * _rate_draws(entries[(a, p[a])], uniforms[a]) for a, w in terms.items()) for _, p in plan]
    )
    result = combine_over_seeds(estimates, samples, ctx.alpha, "percentile", np.random.default_rng(ctx.seed + 2))
    method = (
        "Jeffreys Beta(k+1/2, n-k+1/2) draws, independent between arms (per-prompt outcomes not recorded; conservative)"
    )
    if len(plan) > 1:
        method += ", one shared uniform per arm across its seeds (same prompts), seeds resampled"
    return _finish(result, plan, estimates, comparison, metric, ctx.alpha, method)


def _arm_uniforms(ctx, arm: str, key: str) -> np.ndarray:
    rng = np.random.default_rng([ctx.seed, zlib.crc32(arm.encode()), zlib.crc32(key.encode())])
    return rng.random(ctx.n_resamples)


def _rate_draws(entry, uniforms: np.ndarray) -> np.ndarray:
    return jeffreys_quantiles(round(float(entry.rate) * int(entry.n)), int(entry.n), uniforms)


def jeffreys_quantiles(k: int, n: int, u: np.ndarray) -> np.ndarray:
    """Quantiles `u` of the Jeffreys posterior of a proportion after k successes in n trials,
    Beta(k + 1/2, n - k + 1/2), whose equal-tailed interval is the Jeffreys interval (Brown, Cai &
    DasGupta 2001). With u uniform these are draws; one u for several runs couples them."""
    from scipy.stats import beta

    if not 0 <= k <= n or n < 1:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    return beta.ppf(u, k + 0.5, n - k + 0.5)


def decide(low: float, high: float, p_adjusted: float, alpha: float, margin: float | None) -> Decision:
    """ "different" when the Holm-adjusted p is below alpha; "equivalent" (no difference that
    matters) only when the whole CI lies inside ±margin; otherwise "inconclusive"."""
    if p_adjusted < alpha:
        return "different"
    if margin is not None and -margin < low and high < margin:
        return "equivalent"
    return "inconclusive"
