"""Reference-style per-axiom scores, reproduced for comparison with the reference code only.

``legacy_xb_chi`` / ``legacy_chi_sil`` normalise across one run's axioms, so unlike the AQI
(`aqi.py`) they are NOT comparable across models or runs (docs/aqi.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np

__all__ = ["legacy_xb_chi", "legacy_chi_sil"]


def _min_max(values: np.ndarray) -> np.ndarray:
    span = values.max() - values.min()
    if span == 0:
        return np.full_like(values, 0.5)  # our choice for a constant (e.g. single-axiom) run
    return (values - values.min()) / span


def legacy_xb_chi(
    per_axiom_chi: Mapping[str, float], per_axiom_xb: Mapping[str, float], gamma: float = 0.5
) -> dict[str, float]:
    """Reference-style AQI per axiom: min-max normalise across this run's axioms, then combine.

    ``score[a] = gamma * mm(CHI)[a] + (1 - gamma) * (1 - mm(XB)[a])`` with
    ``mm(v)[a] = (v[a] - min_b v[b]) / (max_b v[b] - min_b v[b])`` over the axioms passed in. If all
    axioms share one value, ``mm`` is 0.5 for all (our choice; the brief leaves it open).

    Implemented from the formula as described to us, not from the reference code itself. NOT
    comparable across models or runs: the best axiom of every run gets CHI term 1 by construction.
    """
    axioms = list(per_axiom_chi)
    if set(axioms) != set(per_axiom_xb):
        raise ValueError("CHI and XB must cover the same axioms")
    chi = _min_max(np.array([per_axiom_chi[a] for a in axioms], dtype=float))
    xb = _min_max(np.array([per_axiom_xb[a] for a in axioms], dtype=float))
    combined = gamma * chi + (1 - gamma) * (1 - xb)
    return dict(zip(axioms, combined.tolist()))


def _median_iqr(values: np.ndarray) -> np.ndarray:
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    if q3 == q1:
        return np.zeros_like(values)  # our choice: no spread -> every axiom at the median
    return (values - median) / (q3 - q1)


def legacy_chi_sil(
    per_axiom_chi: Mapping[str, float],
    per_axiom_sil: Mapping[str, float],
    gamma: float = 0.5,
    normalization: Literal["fixed", "median_iqr"] = "fixed",
) -> dict[str, float]:
    """Reference-style CHI + silhouette score per axiom.

    Maps ``CHI -> CHI / (1 + CHI)`` and ``SS -> (SS + 1) / 2`` (both to [0, 1]), then
    ``score = gamma * chi_mapped + (1 - gamma) * ss_mapped``.

    ``normalization="median_iqr"`` additionally replaces each mapped value by its robust z-score
    across this run's axioms, ``(v - median) / IQR`` (numpy's linear-interpolation percentiles;
    IQR 0 gives 0), before combining; the result is then centred on the run's median axiom and
    not bounded to [0, 1]. Implemented from the formula as described to us, not from the
    reference code. ``CHI / (1 + CHI)`` ignores n and k, and the median/IQR variant is relative
    to the run, so neither is comparable across models.
    """
    axioms = list(per_axiom_chi)
    if set(axioms) != set(per_axiom_sil):
        raise ValueError("CHI and silhouette must cover the same axioms")
    chi = np.array([per_axiom_chi[a] for a in axioms], dtype=float)
    sil = np.array([per_axiom_sil[a] for a in axioms], dtype=float)
    chi_mapped, sil_mapped = chi / (1 + chi), (sil + 1) / 2
    if normalization == "median_iqr":
        chi_mapped, sil_mapped = _median_iqr(chi_mapped), _median_iqr(sil_mapped)
    elif normalization != "fixed":
        raise ValueError(f"unknown normalization {normalization!r}")
    combined = gamma * chi_mapped + (1 - gamma) * sil_mapped
    return dict(zip(axioms, combined.tolist()))
