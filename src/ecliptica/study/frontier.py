"""Arms compared at matched drift: each outcome interpolated along each (arm, seed)'s frontier at named KL levels.

**The frontier** of one (arm, seed) is the piecewise-linear curve through its points (every learning rate x
every evaluated step) sorted by benign token KL to the base; points with equal KL are averaged. **The value at a
KL level** is read off that curve, linear in log KL between the two points that bracket the level (primary
rule, `linear_log_kl`). A level outside the seed's KL range is not answerable (no extrapolation). The same
value by linear interpolation in KL (`linear_kl`) is the second rule; the difference between the two is
reported as the interpolation's own error.

**Uncertainty.** Each bootstrap draw resamples, jointly for every point (so the points stay paired: every run
was scored on the same prompts), the evaluation prompts of each per-prompt outcome, the drift examples (so
the KL positions move too) and the held-out pairs, and resamples the seeds (the same seeds for every arm of a
contrast: runs of one seed share data order). The contrast of a draw is the mean over the drawn seeds of
`sum(w * value(arm, seed, level))`; seeds whose frontier does not reach the level in that draw are left out of
that draw's mean, and the share of such draws is reported. The interval is the percentile interval of the
draws, the p-value the two-sided bootstrap p at 0. Scalar outcomes (AQI, capability) have no per-prompt
record: their values vary only through the seeds and the KL positions, which the method names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ..evaluation.stats import holm_adjust, iid_indices, percentile_interval, two_sided_bootstrap_p
from .frontier_points import FrontierPoint, Ratio

Rule = Literal["linear_log_kl", "linear_kl"]
ALTERNATE: dict[str, Rule] = {"linear_log_kl": "linear_kl"}


def interpolate(kl: np.ndarray, y: np.ndarray, levels: np.ndarray, rule: Rule = "linear_log_kl") -> np.ndarray:
    """Values at `levels` along the curve through (kl, y) sorted by kl; NaN outside [min kl, max kl].

    Equal KL values are averaged. On the log scale a point at KL 0 sits at -inf, so between it and the next
    point the curve is flat at the next point's value (the limit of the log rule).
    """
    kl, y, levels = np.asarray(kl, float), np.asarray(y, float), np.atleast_1d(np.asarray(levels, float))
    xs, inverse = np.unique(kl, return_inverse=True)
    ys = np.bincount(inverse, weights=y) / np.bincount(inverse)
    out = np.full(levels.shape, np.nan)
    inside = (levels >= xs[0]) & (levels <= xs[-1])
    if not inside.any():
        return out
    if rule == "linear_kl":
        out[inside] = np.interp(levels[inside], xs, ys)
        return out
    if rule != "linear_log_kl":
        raise ValueError(f"unknown interpolation rule {rule!r}")
    positive = xs > 0
    lx, ly = np.log(xs[positive]), ys[positive]
    if lx.size == 0:  # every point at KL 0: only level 0 is inside, and levels are positive
        return out
    lv = np.log(levels[inside])
    # below the first positive KL (only reachable when a KL-0 point brackets): the first positive point's value
    out[inside] = np.interp(lv, lx, ly, left=ly[0])
    return out


@dataclass
class SeedCurve:
    """One (arm, seed)'s values at some KL levels: the estimate (L) and the bootstrap draws (R x L)."""

    estimate: np.ndarray
    draws: np.ndarray
    kl_range: tuple[float, float]


class Frontier:
    """The study's frontier points, with one shared set of bootstrap draws over prompts and drift examples."""

    def __init__(self, points: Sequence[FrontierPoint], n_resamples: int = 1000, seed: int = 0):
        if not points:
            raise ValueError("the frontier has no points (no checkpoint of any run was evaluated)")
        self.points = list(points)
        self.n_resamples, self.seed = n_resamples, seed
        self.by_run: dict[tuple[str, int], list[FrontierPoint]] = {}
        for p in self.points:
            self.by_run.setdefault((p.arm, p.seed), []).append(p)
        # one index matrix per item set, shared by every point (paired), each from its own stream of the seed
        self._idx = {"kl": iid_indices(_aligned(self.points, lambda p: p.kl, "drift examples"), n_resamples, seed)}
        for k, name in enumerate(sorted({o for p in self.points for o in p.per_prompt}), start=1):
            n = _aligned([p for p in self.points if name in p.per_prompt], lambda p, o=name: p.per_prompt[o], name)
            self._idx[name] = iid_indices(n, n_resamples, seed + 1000 * k)
        self._kl = {id(p): (p.kl.value(), p.kl.on(self._idx["kl"])) for p in self.points}
        self._curves: dict[tuple, SeedCurve] = {}  # the same curve serves every contrast and question that asks

    @property
    def arms(self) -> list[str]:
        return list(dict.fromkeys(p.arm for p in self.points))

    def seeds(self, arm: str) -> list[int]:
        return sorted(s for a, s in self.by_run if a == arm)

    def outcome_names(self) -> list[str]:
        return list(dict.fromkeys([o for p in self.points for o in (*p.per_prompt, *p.scalar)]))

    def lacking(self, outcome: str, arm: str | None = None) -> list[FrontierPoint]:
        return [p for p in self.points if (arm is None or p.arm == arm) and not _has(p, outcome)]

    def outcome(self, p: FrontierPoint, name: str) -> tuple[float, np.ndarray]:
        """The point's outcome and its value in every draw (a scalar outcome does not vary with prompts)."""
        if name in p.per_prompt:
            ratio: Ratio = p.per_prompt[name]
            return ratio.value(), ratio.on(self._idx[name])
        value = p.scalar[name]
        return value, np.full(self.n_resamples, value)

    def kl(self, p: FrontierPoint) -> tuple[float, np.ndarray]:
        return self._kl[id(p)]

    def seed_curve(self, arm: str, seed: int, outcome: str, levels: Sequence[float], rule: Rule) -> SeedCurve:
        key = (arm, seed, outcome, tuple(levels), rule)
        if key not in self._curves:
            self._curves[key] = self._seed_curve(arm, seed, outcome, levels, rule)
        return self._curves[key]

    def _seed_curve(self, arm: str, seed: int, outcome: str, levels: Sequence[float], rule: Rule) -> SeedCurve:
        pts = self.by_run[(arm, seed)]
        levels = np.asarray(levels, float)
        kl_est = np.array([self.kl(p)[0] for p in pts])
        y_est = np.array([self.outcome(p, outcome)[0] for p in pts])
        kl_draws = np.stack([self.kl(p)[1] for p in pts], axis=1)  # R x points
        y_draws = np.stack([self.outcome(p, outcome)[1] for p in pts], axis=1)
        draws = np.stack([interpolate(kl_draws[b], y_draws[b], levels, rule) for b in range(self.n_resamples)])
        return SeedCurve(interpolate(kl_est, y_est, levels, rule), draws, (float(kl_est.min()), float(kl_est.max())))


def _has(p: FrontierPoint, outcome: str) -> bool:
    return outcome in p.per_prompt or outcome in p.scalar


def _aligned(points: Sequence[FrontierPoint], get, what: str) -> int:
    """Every point must hold the same items in the same order (the draws pair them); returns the item count."""
    ref = get(points[0])
    for p in points[1:]:
        r = get(p)
        if r.ids.shape != ref.ids.shape or not np.array_equal(r.ids, ref.ids):
            raise ValueError(
                f"{r.source}: its {what} are not the same items in the same order as {ref.source} "
                f"({r.ids.size} vs {ref.ids.size} items); every checkpoint must be evaluated on the same prompts"
            )
    return ref.ids.size


def frontier_contrast(
    fr: Frontier,
    terms: Mapping[str, float],
    outcome: str,
    level: float,
    *,
    rule: Rule = "linear_log_kl",
    alpha: float = 0.05,
    comparison: str | None = None,
) -> dict[str, Any]:
    """`sum(w * outcome(arm))` at KL `level`, paired by seed; or why it is not answerable."""
    comparison = comparison or " ".join(f"{w:+g}·{a}" for a, w in terms.items())
    base = {"comparison": comparison, "outcome": outcome, "kl_level": level, "rule": rule}
    missing = [a for a in terms if a not in fr.arms]
    if missing:
        return {
            **base,
            "answerable": False,
            "reason": f"not answerable: arm(s) {', '.join(missing)} not in the frontier",
        }
    lacking = [p for a in terms for p in fr.lacking(outcome, a)]
    if lacking:
        return {
            **base,
            "answerable": False,
            "reason": f"not answerable: {outcome} is missing in {len(lacking)} point(s), e.g. {lacking[0].label}",
        }
    seeds = sorted(set.intersection(*(set(fr.seeds(a)) for a in terms)))
    if not seeds:
        return {**base, "answerable": False, "reason": f"not answerable: arms {', '.join(terms)} share no seed"}
    curves = {
        r: {(a, s): fr.seed_curve(a, s, outcome, [level], r) for a in terms for s in seeds}
        for r in (rule, ALTERNATE[rule])
    }
    out_of_range = [(a, s) for (a, s), c in curves[rule].items() if not np.isfinite(c.estimate[0])]
    if out_of_range:
        a, s = out_of_range[0]
        lo, hi = curves[rule][(a, s)].kl_range
        return {
            **base,
            "answerable": False,
            "reason": f"not answerable: KL {level:g} is outside the frontier of {a} seed {s} (KL {lo:.3g} to {hi:.3g}); "
            "no extrapolation",
        }

    def per_seed(r: Rule, draws: bool) -> np.ndarray:
        pick = (lambda c: c.draws[:, 0]) if draws else (lambda c: c.estimate[0])
        return np.stack([sum(w * pick(curves[r][(a, s)]) for a, w in terms.items()) for s in seeds], axis=-1)

    estimates = per_seed(rule, False)  # (k,)
    alternate = per_seed(ALTERNATE[rule], False)
    draws = per_seed(rule, True)  # R x k
    rng = np.random.default_rng(fr.seed + 7)
    picks = rng.integers(0, len(seeds), size=(fr.n_resamples, len(seeds)))
    picked = draws[np.arange(fr.n_resamples)[:, None], picks]
    finite = np.isfinite(picked)
    counts = finite.sum(axis=1)
    # a draw's mean over its seeds whose frontier reaches the level (NaN when none does: left out of the interval)
    combined = np.where(counts > 0, np.where(finite, picked, 0.0).sum(axis=1) / np.maximum(counts, 1), np.nan)
    partial = float(np.mean(counts < len(seeds)))
    estimate = float(estimates.mean())
    low, high = percentile_interval(combined, alpha)
    scalar = all(outcome not in p.per_prompt for p in fr.points)
    return {
        **base,
        "answerable": True,
        "estimate": estimate,
        "low": low,
        "high": high,
        "p_value": two_sided_bootstrap_p(combined, 0.0),
        "alpha": alpha,
        "n_seeds": len(seeds),
        "per_seed": {str(s): float(v) for s, v in zip(seeds, estimates)},
        # the interpolation's own error: how far the second rule's estimate lies from the primary's
        "estimate_alternate_rule": float(alternate.mean()),
        "interpolation_error": abs(float(alternate.mean()) - estimate),
        "draws_with_seed_out_of_range": partial,
        "method": (
            "bootstrap over seeds and drift examples (no per-prompt record: outcome varies through seeds and KL)"
            if scalar
            else "bootstrap over seeds, prompts and drift examples (paired), percentile interval"
        ),
    }


def frontier_findings(
    fr: Frontier,
    questions: Sequence[Any],
    outcomes: Sequence[str],
    levels: Sequence[float],
    *,
    rule: Rule = "linear_log_kl",
    alpha: float = 0.05,
    extra: Mapping[str, list[dict[str, Any]]] | None = None,
) -> list[dict[str, Any]]:
    """Every declared contrast x outcome x KL level, Holm-adjusted within its question.

    `questions` are the study's `Question`s (their contrasts' terms; other parts do not apply to the frontier);
    `extra` holds further tests by question id (e.g. Q2's convergence tests), adjusted in the same family.
    """
    out = []
    for q in questions:
        family = []
        for c in q.contrasts:
            if c.only_if_present and any(a not in fr.arms for a in c.terms):
                continue
            for outcome in outcomes:
                for level in levels:
                    family.append(
                        {
                            "question": q.id,
                            **frontier_contrast(
                                fr, c.terms, outcome, level, rule=rule, alpha=alpha, comparison=c.label
                            ),
                        }
                    )
        family += [{"question": q.id, **t} for t in (extra or {}).get(q.id, [])]
        out += holm_within(family, alpha)
    return out


def holm_within(family: list[dict[str, Any]], alpha: float) -> list[dict[str, Any]]:
    """Holm-adjusted p and the significance read from it, over the answerable tests of one family."""
    tested = [t for t in family if t.get("answerable") and np.isfinite(t.get("p_value", np.nan))]
    for t, p in zip(tested, holm_adjust([t["p_value"] for t in tested])):
        t.update(p_holm=p, significant=bool(p < alpha), family_size=len(tested))
    return family
