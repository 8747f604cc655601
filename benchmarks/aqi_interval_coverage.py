"""Coverage of the AQI bootstrap intervals in simulation (CPU, ~20 min; --reps 20 for a quick look): docs/aqi.md.

Two Gaussian classes of n/2 prompts each, unit within-class variance.

* Discriminant AQI (the headline): the gap lies along one axis of a d-dimensional cloud; 5-fold
  cross-fitted shrinkage LDA (`discriminant.cross_fitted_projection`), AQI of the held-out 1-D
  projections. Its target at a given n is E[estimate] (the expected cross-fitted AQI on a fresh
  prompt set of that size; estimated from extra simulated data sets without a bootstrap). The
  infinite-data value (Bayes direction) is shown too: the cross-fitted estimate sits below it
  because a direction learned from n prompts is worse than the true one.
* Geometric AQI (secondary): a gap of `shift` in every coordinate (the geometric rows of docs/aqi.md's
  coverage table); the target is the closed-form population value.

    PYTHONPATH=src python benchmarks/aqi_interval_coverage.py [--reps 100]
"""

from __future__ import annotations

import argparse

import numpy as np

from ecliptica.evaluation.aqi import AqiStat
from ecliptica.evaluation.discriminant import cross_fitted_projection, fold_assignment
from ecliptica.evaluation.stats import bootstrap_ci

METHODS = ("percentile", "basic", "bca")


def classes(rng, n: int, d: int, gap_axis: float = 0.0, shift: float = 0.0):
    y = np.repeat(["safe", "unsafe"], n // 2)
    X = rng.normal(size=(n, d))
    X[n // 2 :, 0] += gap_axis
    X[n // 2 :] += shift
    return X, y


def discriminant_projection(X, y):
    folds = fold_assignment([str(i) for i in range(len(y))], y, 5, seed=0)
    return cross_fitted_projection(X, y, folds)[:, None]


def bayes_aqi(gap: float) -> float:
    """1-D projection on the true direction: B/(B+W) = (gap^2/4)/(gap^2/4 + 1), XB = 1/gap^2."""
    if gap == 0:
        return 0.0
    return 0.5 * (gap**2 / 4) / (gap**2 / 4 + 1) + 0.5 / (1 + 1 / gap**2)


def geometric_population(d: int, shift: float) -> float:
    if shift == 0:
        return 0.0
    d2 = shift**2 * d
    return 0.5 * (d2 / 4) / (d2 / 4 + d) + 0.5 / (1 + d / d2)


def run(label: str, make, target_of, reps: int, n_resamples: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    est, hits, inside, widths = [], {m: 0 for m in METHODS}, {m: 0 for m in METHODS}, {m: [] for m in METHODS}
    draws = [make(rng) for _ in range(reps)]
    target = target_of(rng)
    for r, (Z, y) in enumerate(draws):
        for method in METHODS:
            ci = bootstrap_ci(AqiStat(), Z, y, n_resamples=n_resamples, seed=r, method=method)
            hits[method] += ci["low"] <= target <= ci["high"]
            inside[method] += ci["contains_estimate"]
            widths[method].append(ci["high"] - ci["low"])
        est.append(AqiStat()(Z, y))
    cells = " | ".join(f"{hits[m] / reps:.0%} / {inside[m] / reps:.0%}" for m in METHODS)
    print(f"| {label} | {np.mean(est):.4f} | {target:.4f} | {cells} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--n-resamples", type=int, default=1000)
    ap.add_argument("--n", type=int, default=200)
    a = ap.parse_args()
    n = a.n
    print(
        f"n={n}, {a.reps} data sets, {a.n_resamples} resamples each; cells: coverage of the target / "
        "share of intervals containing their own estimate"
    )
    print("| setting | mean estimate | target | " + " | ".join(METHODS) + " |")
    print("|---|---|---|" + "---|" * len(METHODS))

    for d, gap in ((64, 0.0), (64, 1.0), (64, 2.0), (576, 1.0)):

        def make(rng, d=d, gap=gap):
            X, y = classes(rng, n, d, gap_axis=gap)
            return discriminant_projection(X, y), y

        def expected(rng, make=make):  # E[estimate] at this n, from fresh data sets
            return float(np.mean([AqiStat()(*make(rng)) for _ in range(200)]))

        run(
            f"discriminant, d={d}, gap {gap} (target E[est]; Bayes value {bayes_aqi(gap):.3f})",
            make,
            expected,
            a.reps,
            a.n_resamples,
            seed=d + int(10 * gap),
        )

    for d, shift in ((16, 0.0), (300, 0.3), (576, 1.0)):

        def make(rng, d=d, shift=shift):
            return classes(rng, n, d, shift=shift)

        run(
            f"geometric, d={d}, shift {shift}/coord (target: population)",
            make,
            lambda rng, d=d, shift=shift: geometric_population(d, shift),
            a.reps,
            a.n_resamples,
            seed=d,
        )


if __name__ == "__main__":
    main()
