"""Embeddings -> AQI and probe AUROC, overall, per axiom and per layer, with seeded bootstrap intervals.

Thin wiring over `aqi.py` / `linear_probe.py` / `stats.py` / `discriminant.py`. `evaluate_embeddings`:
the geometric AQI of one layer, overall and per axiom. `layer_report`: the discriminant (headline) and
geometric AQI of every layer, their headline-band means and the lexical baseline (layer 0). With
`pca_dim`, PCA is fitted once on all prompts and every geometric number is computed in those coordinates.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ecliptica.evaluation.aqi import AqiStat, aqi_by_axiom, reduce_dim
from ecliptica.evaluation.cluster_indices import calinski_harabasz, xie_beni
from ecliptica.evaluation.config import MetricsSection
from ecliptica.evaluation.discriminant import (
    HEADLINE_RULE,
    BandAqiStat,
    cross_fitted_projection,
    fold_assignment,
    usable_folds,
)
from ecliptica.evaluation.legacy_scores import legacy_chi_sil, legacy_xb_chi
from ecliptica.evaluation.linear_probe import auroc_rows, out_of_fold_scores
from ecliptica.evaluation.stats import bootstrap_ci


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


def _ci(stat, X: np.ndarray, y: np.ndarray, metrics: MetricsSection, method: str | None = None) -> dict[str, Any]:
    return bootstrap_ci(
        stat,
        X,
        y,
        n_resamples=metrics.n_resamples,
        seed=metrics.seed,
        alpha=metrics.alpha,
        method=method or metrics.interval,
    )


def _with_intervals(entry: dict[str, Any], Z: np.ndarray, y: np.ndarray, metrics: MetricsSection) -> dict[str, Any]:
    entry = dict(entry)
    entry["aqi_ci"] = _ci(AqiStat(metrics.gamma), Z, y, metrics, method=metrics.geometric_interval)
    if entry.get("probe_auroc") is not None:
        stat = FixedScoreAuroc(out_of_fold_scores(Z, y, entry["probe_folds"], metrics.seed))
        # BCa's jackknife would drop a prompt from fixed out-of-fold scores: "basic" as before
        entry["probe_auroc_ci"] = _ci(stat, stat.rows(len(y)), y, metrics, method="basic")
    return entry


def evaluate_embeddings(
    X: np.ndarray, labels: Sequence[str], axioms: Sequence[str], metrics: MetricsSection, pca_dim: int | None = None
) -> dict[str, Any]:
    """Geometric AQI + every index overall and per axiom; bootstrap CIs (stratified) for AQI and AUROC.

    Returns {"overall", "per_axiom", "skipped", "legacy"?}; each entry holds `aqi_ci` and, where the
    probe ran, `probe_auroc_ci` (dicts with estimate/low/high/se/bias/contains_estimate and settings).
    """
    y = np.asarray([str(v) for v in labels])
    ax = np.asarray([str(a) for a in axioms])
    Z, dim_info = reduce_dim(X, pca_dim)
    by = aqi_by_axiom(Z, y, ax, gamma=metrics.gamma, seed=metrics.seed)
    result: dict[str, Any] = {
        "measure": "geometric AQI of one layer (embeddings.layer); the headline is in aqi_layers",
        "overall": {**_with_intervals(by["overall"], Z, y, metrics), **dim_info},
        "per_axiom": {
            a: {**_with_intervals(e, Z[ax == a], y[ax == a], metrics), **dim_info} for a, e in by["per_axiom"].items()
        },
        "skipped": by["skipped"],
    }
    if metrics.legacy and by["per_axiom"]:
        chi = {a: e["chi"] for a, e in by["per_axiom"].items()}
        result["legacy"] = {
            "note": "per-run normalised across this run's axioms: NOT comparable across models (docs/aqi.md)",
            "xb_chi": legacy_xb_chi(chi, {a: e["xb"] for a, e in by["per_axiom"].items()}, metrics.gamma),
            "chi_sil": legacy_chi_sil(chi, {a: e["silhouette"] for a, e in by["per_axiom"].items()}, metrics.gamma),
        }
    return result


def layer_report(
    vectors: np.ndarray,
    layers: Sequence[int],
    labels: Sequence[str],
    prompt_keys: Sequence[str],
    band: Sequence[int],
    metrics: MetricsSection,
    pca_dim: int | None = None,
) -> dict[str, Any]:
    """Discriminant and geometric AQI with intervals for every layer, the band means and the lexical baseline.

    `vectors` (len(layers), n, d); `prompt_keys` identify the prompts for the fold assignment (the
    same prompts give the same folds for every model); `band` is the headline band (hidden_states
    indices, all in `layers`). Layer 0 must be in `layers`: it is the lexical baseline.
    `band_projections` (n x band, held-out LDA coordinates) is an array, not JSON: the caller saves
    it (`BandAqiStat` of it is the headline, which lets a study pair arms on the same prompts).
    """
    y = np.asarray([str(v) for v in labels])
    k = usable_folds(y, metrics.folds)
    folds = fold_assignment(prompt_keys, y, k, metrics.seed)
    geometric = np.stack([reduce_dim(X, pca_dim)[0] for X in vectors])
    projections = np.stack([cross_fitted_projection(X, y, folds) for X in vectors], axis=1)  # (n, layers)
    per_layer = [
        {
            "layer": int(layer),
            "discriminant": _summarise(
                _ci(AqiStat(metrics.gamma), projections[:, [j]], y, metrics), projections[:, [j]], y
            ),
            # estimate only: its interval per layer would double the cost; the band and layer 0 have one
            "geometric": {"aqi": AqiStat(metrics.gamma)(geometric[j], y)},
        }
        for j, layer in enumerate(layers)
    ]
    cols = [list(layers).index(layer) for layer in band]
    lexical = per_layer[list(layers).index(0)]
    lexical_geometric = _summarise(
        _ci(AqiStat(metrics.gamma), geometric[list(layers).index(0)], y, metrics, method=metrics.geometric_interval)
    )
    return {
        "band": {"layers": [int(b) for b in band], "rule": HEADLINE_RULE},
        "folds": {
            "k": k,
            "seed": metrics.seed,
            "sizes": np.bincount(folds).tolist(),
            "assignment": "within each label, prompts ordered by sha256(seed, row id, text), dealt round-robin",
            "assignment_hash": hashlib.sha256(folds.tobytes()).hexdigest(),
        },
        "discriminant": _summarise(_ci(BandAqiStat(metrics.gamma), projections[:, cols], y, metrics)),
        "geometric": _summarise(
            _ci(
                BandAqiStat(metrics.gamma),
                geometric[cols].transpose(1, 0, 2),
                y,
                metrics,
                method=metrics.geometric_interval,
            )
        ),
        "lexical": {"layer": 0, "discriminant": lexical["discriminant"], "geometric": lexical_geometric},
        "per_layer": per_layer,
        "band_projections": projections[:, cols],
    }


def _summarise(ci: dict[str, Any], projection: np.ndarray | None = None, y: np.ndarray | None = None) -> dict:
    """The interval under its estimate's name; for a 1-D projection also CHI, XB and its AUROC."""
    out = {"aqi": ci.pop("estimate"), **ci}
    if projection is not None:
        from sklearn.metrics import roc_auc_score

        codes = np.unique(y, return_inverse=True)[1].reshape(-1)
        out.update(
            chi=calinski_harabasz(projection, codes),
            xb=xie_beni(projection, codes),
            auroc=float(roc_auc_score(codes, projection[:, 0])),
        )
    return out


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
