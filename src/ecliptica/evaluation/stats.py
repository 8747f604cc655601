"""Resampling statistics shared by the evaluation metrics: bootstrap CIs and paired tests.

Everything here is seeded (``numpy.random.default_rng(seed)``) so a rerun with the same inputs and
seed gives bit-identical intervals.

A *statistic* is any callable ``stat(X, y) -> float``. It may also offer a vectorised path,
``stat.on_resamples(X, y, idx) -> ndarray[R]``, that evaluates all ``R`` resamples given as a row
of prompt indices each (``idx`` has shape ``(R, n)``). The bootstrap uses that path when present,
otherwise it calls ``stat(X[idx[r]], y[idx[r]])`` in a loop. Both paths see the same indices.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

ArrayLike = Any


@runtime_checkable
class ResamplableStat(Protocol):
    """A statistic with a fast path over many bootstrap resamples at once."""

    def __call__(self, X: np.ndarray, y: np.ndarray) -> float: ...

    def on_resamples(self, X: np.ndarray, y: np.ndarray, idx: np.ndarray) -> np.ndarray: ...


StatFn = Callable[[np.ndarray, np.ndarray], float]


# --------------------------------------------------------------------------- index resampling


def resample_indices(
    y: ArrayLike, n_resamples: int, seed: int | np.random.Generator = 0, stratified: bool = True
) -> np.ndarray:
    """Draw ``(n_resamples, n)`` bootstrap index rows.

    Stratified: each label keeps its original count (draws with replacement inside each label), so
    every resample holds both classes and class proportions don't add noise to the statistic.
    Unstratified: plain i.i.d. draws; a row missing some label is redrawn, so it is conditional on
    all labels being present (rare to matter for n >= 20).
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(y)
    n = labels.shape[0]
    if n == 0:
        raise ValueError("cannot bootstrap an empty sample")
    if stratified:
        return _stratified_indices(labels, n_resamples, rng)
    return _iid_indices_all_labels(labels, n_resamples, rng)


def iid_indices(n: int, n_resamples: int, seed: int = 0) -> np.ndarray:
    """``(n_resamples, n)`` plain i.i.d. bootstrap index rows (one draw of the seeded generator): for
    statistics of unlabelled items (examples, pairs, completions)."""
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def _stratified_indices(labels: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    idx = np.empty((n_resamples, labels.shape[0]), dtype=np.int64)
    start = 0
    for value in np.unique(labels):  # sorted: fixed, seed-reproducible draw order
        members = np.flatnonzero(labels == value)
        picks = rng.integers(0, members.size, size=(n_resamples, members.size))
        idx[:, start : start + members.size] = members[picks]
        start += members.size
    return idx


def _iid_indices_all_labels(labels: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    n = labels.shape[0]
    _, codes = np.unique(labels, return_inverse=True)
    n_labels = codes.max() + 1
    idx = rng.integers(0, n, size=(n_resamples, n))
    for _ in range(1000):
        bad = _rows_missing_a_label(codes[idx], n_labels)
        if not bad.any():
            return idx
        idx[bad] = rng.integers(0, n, size=(int(bad.sum()), n))
    raise RuntimeError("could not draw resamples containing every label; use stratified=True")


def _rows_missing_a_label(code_rows: np.ndarray, n_labels: int) -> np.ndarray:
    present = np.zeros((code_rows.shape[0], n_labels), dtype=bool)
    present[np.arange(code_rows.shape[0])[:, None], code_rows] = True
    return ~present.all(axis=1)


def counts_from_indices(idx: np.ndarray, n: int) -> np.ndarray:
    """Multiplicity of each original point in each resample: ``(R, n)`` float matrix."""
    n_resamples = idx.shape[0]
    flat = (idx + n * np.arange(n_resamples)[:, None]).ravel()
    return np.bincount(flat, minlength=n_resamples * n).reshape(n_resamples, n).astype(float)


# --------------------------------------------------------------------------- bootstrap


def evaluate_on_resamples(stat_fn: StatFn, X: np.ndarray, y: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Statistic on every resample, via the vectorised path when the statistic has one."""
    if isinstance(stat_fn, ResamplableStat):
        return np.asarray(stat_fn.on_resamples(X, y, idx), dtype=float)
    return np.array([stat_fn(X[rows], y[rows]) for rows in idx], dtype=float)


IntervalMethod = Literal["percentile", "basic", "bca"]


def bootstrap_interval(
    samples: np.ndarray, estimate: float, alpha: float, method: IntervalMethod, jackknife: np.ndarray | None = None
) -> tuple[float, float]:
    """The (1 - alpha) interval from bootstrap `samples` of a statistic whose full-sample value is `estimate`.

    "bca" needs the leave-one-out values `jackknife` (for the acceleration); see `bca_interval`.
    """
    if method == "bca":
        if jackknife is None:
            raise ValueError("method 'bca' needs the jackknife (leave-one-out) values of the statistic")
        return bca_interval(samples, estimate, jackknife, alpha)
    q_lo, q_hi = percentile_interval(samples, alpha)
    if method == "percentile":
        return q_lo, q_hi
    if method == "basic":
        return 2 * estimate - q_hi, 2 * estimate - q_lo
    raise ValueError(f"unknown method {method!r}")


def bca_interval(samples: np.ndarray, estimate: float, jackknife: np.ndarray, alpha: float) -> tuple[float, float]:
    """Bias-corrected and accelerated (BCa) percentile interval (Efron 1987; scipy's formulas).

    ``z0 = Phi^-1(share of samples below the estimate, ties counted half)`` corrects for a median
    bias of the bootstrap distribution; ``a = sum(d^3) / (6 sum(d^2)^1.5)`` with ``d`` the jackknife
    values' deviations from their mean corrects for a skew that changes with the parameter. The
    ends are the sample quantiles at ``Phi(z0 + (z0 + z) / (1 - a (z0 + z)))`` for ``z = z_{alpha/2},
    z_{1-alpha/2}``. Equals ``scipy.stats.bootstrap(method="BCa")`` given the same samples (tested).
    When every sample lies on one side of the estimate, ``z0`` is infinite and the interval cannot
    contain the estimate; ``bootstrap_ci`` flags this (``contains_estimate``).
    """
    from scipy.stats import norm

    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return float("nan"), float("nan")
    below = (np.sum(finite < estimate) + np.sum(finite <= estimate)) / (2 * finite.size)
    with np.errstate(divide="ignore"):
        z0 = norm.ppf(below)
    dev = np.mean(jackknife) - np.asarray(jackknife, dtype=float)
    denom = 6.0 * np.sum(dev**2) ** 1.5
    accel = float(np.sum(dev**3) / denom) if denom > 0 else 0.0
    z = norm.ppf([alpha / 2, 1 - alpha / 2])
    with np.errstate(invalid="ignore"):
        levels = norm.cdf(z0 + (z0 + z) / (1 - accel * (z0 + z)))
    levels = np.nan_to_num(levels, nan=0.5)
    low, high = np.quantile(finite, levels)
    return float(low), float(high)


def jackknife_indices(n: int) -> np.ndarray:
    """(n, n - 1) rows: row i is every index but i (so the resample path can evaluate the jackknife)."""
    full = np.tile(np.arange(n), (n, 1))
    return full[~np.eye(n, dtype=bool)].reshape(n, n - 1)


def _clip(interval: tuple[float, float], bounds: tuple[float, float] | None) -> tuple[float, float]:
    """Keep an interval inside the statistic's range (a statistic may declare ``bounds``)."""
    if bounds is None:
        return interval
    return float(np.clip(interval[0], *bounds)), float(np.clip(interval[1], *bounds))


def interval_note(estimate: float, low: float, high: float, bias: float, se: float) -> str | None:
    """Why an interval does not contain its estimate (None when it does)."""
    if not (np.isfinite(low) and np.isfinite(high)) or low <= estimate <= high:
        return None
    side = "above" if low > estimate else "below"
    return (
        f"interval lies {side} the estimate: the bootstrap distribution is shifted by bias={bias:.3g} "
        f"(se={se:.3g}); resampling duplicates prompts, which inflates separation in high dimensions, "
        "so this interval is not a valid confidence interval for the estimate"
    )


def percentile_interval(samples: np.ndarray, alpha: float) -> tuple[float, float]:
    """Percentile bootstrap interval; NaN samples (undefined statistic) are ignored."""
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return float("nan"), float("nan")
    low, high = np.quantile(finite, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def bootstrap_ci(
    stat_fn: StatFn,
    X: ArrayLike,
    y: ArrayLike,
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    stratified: bool = True,
    method: IntervalMethod = "basic",
    return_samples: bool = False,
) -> dict[str, Any]:
    """Bootstrap CI for ``stat_fn(X, y)``, resampling prompts (rows) with replacement.

    Returns ``estimate`` (on the full sample), ``low``/``high`` (clipped to ``stat_fn.bounds`` when
    the statistic declares one, e.g. (0, 1) for AQI and AUROC), the bootstrap standard error
    ``se``, the bootstrap ``bias`` (mean of resampled statistic minus ``estimate``) and settings.

    ``method="basic"`` (default): ``[2*estimate - q_hi, 2*estimate - q_lo]`` where ``q_lo, q_hi``
    are the ``alpha/2`` and ``1 - alpha/2`` quantiles of the resampled statistic; it subtracts the
    bootstrap's own shift. ``method="percentile"``: ``[q_lo, q_hi]``. Why basic by default: AQI on
    high-dimensional embeddings is biased upward at finite n (noise inflates centroid distances),
    resampling duplicated prompts adds that bias again, and in simulation (n=200, d=576) the
    percentile interval then lies entirely above the estimate and covers the population AQI 0% of
    the time, while the basic interval covers it ~93-97% (docs/aqi.md). When ``bias`` is small
    next to ``se`` the two agree. ``method="bca"``: `bca_interval`, with the jackknife evaluated
    through the statistic's resample path (n extra evaluations).

    Every result says whether the interval contains the estimate (``contains_estimate``) and, when
    it does not, why (``note``): an interval can exclude its estimate when the bootstrap
    distribution is shifted by more than its spread.
    """
    X = np.asarray(X)
    y = np.asarray(y)
    idx = resample_indices(y, n_resamples, seed, stratified)
    samples = evaluate_on_resamples(stat_fn, X, y, idx)
    estimate = float(stat_fn(X, y))
    jackknife = evaluate_on_resamples(stat_fn, X, y, jackknife_indices(len(y))) if method == "bca" else None
    low, high = _clip(bootstrap_interval(samples, estimate, alpha, method, jackknife), getattr(stat_fn, "bounds", None))
    finite = samples[np.isfinite(samples)]
    se = float(np.std(finite, ddof=1)) if finite.size > 1 else float("nan")
    bias = float(finite.mean() - estimate) if finite.size else float("nan")
    result: dict[str, Any] = {
        "estimate": estimate,
        "low": low,
        "high": high,
        "se": se,
        "bias": bias,
        "contains_estimate": bool(low <= estimate <= high),
        "note": interval_note(estimate, low, high, bias, se),
        "alpha": alpha,
        "n_resamples": n_resamples,
        "n_undefined": int((~np.isfinite(samples)).sum()),
        "seed": seed,
        "stratified": stratified,
        "method": method,
    }
    if return_samples:
        result["samples"] = samples
    return result


def paired_bootstrap_test(
    stat_fn: StatFn,
    XA: ArrayLike,
    XB: ArrayLike,
    y: ArrayLike,
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    stratified: bool = True,
    method: IntervalMethod = "basic",
) -> dict[str, Any]:
    """Paired bootstrap for ``stat(A) - stat(B)`` when both models saw the same prompts.

    Row ``i`` of ``XA`` and ``XB`` must be the same prompt. Each resample draws one set of prompt
    indices and applies it to both models, so prompt difficulty cancels in the difference.

    ``low``/``high`` is the ``method`` interval of the difference (as in ``bootstrap_ci``). The
    two-sided p-value inverts that interval:
    ``p = min(1, 2 * min(#(d* <= t) + 1, #(d* >= t) + 1) / (R + 1))`` with ``t = 2 * diff`` for
    "basic" (equivalently: how often the centred ``d* - diff`` reaches ``-diff``) and ``t = 0``
    for "percentile", so ``p < alpha`` exactly when the ``1 - alpha`` interval excludes 0 (up to
    the +1 smoothing, which keeps p > 0).
    """
    XA, XB, y = np.asarray(XA), np.asarray(XB), np.asarray(y)
    if XA.shape[0] != XB.shape[0] or XA.shape[0] != y.shape[0]:
        raise ValueError("XA, XB and y must have one row per prompt, in the same order")
    idx = resample_indices(y, n_resamples, seed, stratified)
    diffs = evaluate_on_resamples(stat_fn, XA, y, idx) - evaluate_on_resamples(stat_fn, XB, y, idx)
    estimate_a, estimate_b = float(stat_fn(XA, y)), float(stat_fn(XB, y))
    diff = estimate_a - estimate_b
    if method == "bca":
        raise ValueError("the paired test supports 'basic' and 'percentile' intervals")
    low, high = bootstrap_interval(diffs, diff, alpha, method)  # differences are not clipped
    threshold = 2 * diff if method == "basic" else 0.0
    return {
        "estimate_a": estimate_a,
        "estimate_b": estimate_b,
        "diff": diff,
        "low": low,
        "high": high,
        "p_value": two_sided_bootstrap_p(diffs, threshold),
        "alpha": alpha,
        "n_resamples": n_resamples,
        "seed": seed,
        "stratified": stratified,
        "method": f"paired {method} bootstrap",
    }


def two_sided_bootstrap_p(diffs: np.ndarray, threshold: float) -> float:
    finite = diffs[np.isfinite(diffs)]
    if finite.size == 0:
        return float("nan")
    below = int((finite <= threshold).sum()) + 1
    above = int((finite >= threshold).sum()) + 1
    return float(min(1.0, 2 * min(below, above) / (finite.size + 1)))


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values for one family of tests (order of the input kept).

    Sorted ascending, ``p_adj(i) = max_{j <= i} min(1, (m - j + 1) * p(j))`` (1-based ``i``); a
    test is rejected at level alpha exactly when ``p_adj < alpha``, which controls the family-wise
    error rate at alpha under any dependence between the tests.
    """
    p = np.asarray(p_values, dtype=float)
    if p.size == 0:
        return []
    if not np.all(np.isfinite(p)) or np.any((p < 0) | (p > 1)):
        raise ValueError(f"p-values must lie in [0, 1], got {p.tolist()}")
    order = np.argsort(p, kind="stable")
    m = p.size
    stepped = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * p[order]))
    adjusted = np.empty(m)
    adjusted[order] = stepped
    return adjusted.tolist()


# --------------------------------------------------------------------------- proportions


def proportion_bootstrap_ci(
    successes: int, total: int, n_resamples: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float]:
    """Percentile bootstrap CI of a proportion.

    Resampling ``total`` 0/1 outcomes with replacement and counting ones is exactly a
    ``Binomial(total, successes/total)`` draw, so we draw that directly (same distribution, O(R)).
    """
    rng = np.random.default_rng(seed)
    rates = rng.binomial(total, successes / total, size=n_resamples) / total
    return percentile_interval(rates, alpha)


def wilson_interval(successes: int, total: int, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson score interval (scipy's binomtest); unlike the bootstrap it is not degenerate at 0% or 100%."""
    from scipy.stats import binomtest

    ci = binomtest(successes, total).proportion_ci(confidence_level=1 - alpha, method="wilson")
    low = 0.0 if successes == 0 else max(0.0, float(ci.low))  # exact ends (avoid 0.9999...)
    high = 1.0 if successes == total else min(1.0, float(ci.high))
    return low, high
