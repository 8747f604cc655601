"""Embeddings -> AQI and probe AUROC, overall and per axiom, with seeded bootstrap intervals.

Thin wiring over `metrics.py` / `stats.py`. With `pca_dim`, PCA is fitted once on all prompts and
every number (overall, per axiom, each bootstrap resample) is computed in those coordinates.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ecliptica.evaluation.metrics import (
    AqiStat,
    auroc_rows,
    aqi_by_axiom,
    bootstrap_ci,
    legacy_chi_sil,
    legacy_xb_chi,
    out_of_fold_scores,
    reduce_dim,
)


class FixedScoreAuroc:
    """`ProbeAurocStat(refit=False)` with its out-of-fold scores computed once and reused.

    Same numbers (the probe is seeded and deterministic), one probe fit instead of two per interval.
    The bootstrap passes row indices as X, so every resample looks up the fixed scores.
    """

    bounds = (0.0, 1.0)

    def __init__(self, scores: np.ndarray):
        self.scores = scores

    def rows(self, n: int) -> np.ndarray:
        return np.arange(n)[:, None]

    def __call__(self, rows: np.ndarray, y: np.ndarray) -> float:
        return float(self.on_resamples(rows, y, rows[:, 0][None, :])[0])

    def on_resamples(self, rows: np.ndarray, y: np.ndarray, idx: np.ndarray) -> np.ndarray:
        positive = np.unique(y, return_inverse=True)[1].reshape(-1) == 1
        return auroc_rows(self.scores[idx], positive[idx])


def _ci(stat, X: np.ndarray, y: np.ndarray, n_resamples: int, seed: int, alpha: float) -> dict[str, Any]:
    out = bootstrap_ci(stat, X, y, n_resamples=n_resamples, seed=seed, alpha=alpha)
    out.pop("samples", None)
    return out


def _with_intervals(entry: dict[str, Any], Z: np.ndarray, y: np.ndarray, gamma: float, n_resamples: int,
                    seed: int, alpha: float) -> dict[str, Any]:
    entry = dict(entry)
    entry["aqi_ci"] = _ci(AqiStat(gamma), Z, y, n_resamples, seed, alpha)
    if entry.get("probe_auroc") is not None:
        stat = FixedScoreAuroc(out_of_fold_scores(Z, y, entry["probe_folds"], seed))
        entry["probe_auroc_ci"] = _ci(stat, stat.rows(len(y)), y, n_resamples, seed, alpha)
    return entry


def evaluate_embeddings(X: np.ndarray, labels: Sequence[str], axioms: Sequence[str], *, gamma: float = 0.5,
                        pca_dim: int | None = None, n_resamples: int = 1000, seed: int = 0,
                        alpha: float = 0.05, legacy: bool = False) -> dict[str, Any]:
    """AQI + every index overall and per axiom; bootstrap CIs (basic, stratified) for AQI and AUROC.

    Returns {"overall", "per_axiom", "skipped", "legacy"?}; each entry holds `aqi_ci` and, where the
    probe ran, `probe_auroc_ci` (dicts with estimate/low/high/se/bias and the resampling settings).
    """
    y = np.asarray([str(v) for v in labels])
    ax = np.asarray([str(a) for a in axioms])
    Z, dim_info = reduce_dim(X, pca_dim)
    by = aqi_by_axiom(Z, y, ax, gamma=gamma, seed=seed)
    result: dict[str, Any] = {
        "overall": {**_with_intervals(by["overall"], Z, y, gamma, n_resamples, seed, alpha), **dim_info},
        "per_axiom": {a: {**_with_intervals(e, Z[ax == a], y[ax == a], gamma, n_resamples, seed, alpha), **dim_info}
                      for a, e in by["per_axiom"].items()},
        "skipped": by["skipped"],
    }
    if legacy and by["per_axiom"]:
        chi = {a: e["chi"] for a, e in by["per_axiom"].items()}
        result["legacy"] = {
            "note": "per-run normalised across this run's axioms: NOT comparable across models (docs/aqi.md)",
            "xb_chi": legacy_xb_chi(chi, {a: e["xb"] for a, e in by["per_axiom"].items()}, gamma),
            "chi_sil": legacy_chi_sil(chi, {a: e["silhouette"] for a, e in by["per_axiom"].items()}, gamma),
        }
    return result


def layer_curve(vectors: np.ndarray, layers: Sequence[int], labels: Sequence[str], *, gamma: float = 0.5,
                pca_dim: int | None = None, n_resamples: int = 1000, seed: int = 0,
                alpha: float = 0.05) -> list[dict[str, Any]]:
    """AQI with its interval for every swept layer (probe skipped: 5 fits per layer add little)."""
    y = np.asarray([str(v) for v in labels])
    curve = []
    for layer, X in zip(layers, vectors):
        Z, _ = reduce_dim(X, pca_dim)
        ci = _ci(AqiStat(gamma), Z, y, n_resamples, seed, alpha)
        curve.append({"layer": int(layer), "aqi": ci["estimate"], "low": ci["low"], "high": ci["high"],
                      "se": ci["se"]})
    return curve


def json_ready(obj: Any) -> Any:
    """numpy scalars -> Python; non-finite floats -> None (strict JSON has no inf/NaN)."""
    if isinstance(obj, dict):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_ready(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
