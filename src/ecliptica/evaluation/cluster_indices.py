"""Cluster indices of labelled embeddings: how far apart the label clouds lie next to their spread.

Inputs are embeddings ``X`` (n x d, one row per prompt) and hard labels ``y`` (0 = safe, 1 = unsafe,
or strings such as "safe"/"unsafe"; any two or more distinct values work). Calinski-Harabasz and
Xie-Beni are the two indices the AQI is built from (`aqi.py`); silhouette and Davies-Bouldin are
reported beside it. The label encoding and the between/within sums of squares are shared with the
AQI and the linear probe so every metric reads the labels the same way.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "encode_labels",
    "labelled_points",
    "class_scatter",
    "calinski_harabasz",
    "xie_beni",
    "silhouette",
    "davies_bouldin",
]

ArrayLike = Any


# --------------------------------------------------------------------------- input handling


def encode_labels(y: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes 0..k-1 in sorted label order (so "unsafe" > "safe" and 1 > 0) and the labels."""
    classes, codes = np.unique(np.asarray(y), return_inverse=True)
    return codes.reshape(-1), classes


def labelled_points(X: ArrayLike, y: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``X`` as a float64 (n x d) array, its label codes and the labels; raises on shapes or one label."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D (n x d), got shape {X.shape}")
    codes, classes = encode_labels(y)
    if codes.shape[0] != X.shape[0]:
        raise ValueError(f"X has {X.shape[0]} rows but y has {codes.shape[0]} labels")
    if classes.size < 2:
        raise ValueError(f"need at least two distinct labels, got {classes.tolist()}")
    return X, codes, classes


def class_scatter(X: np.ndarray, codes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Centroids (k x d), class sizes, within (W) and between (B) sums of squares."""
    sizes = np.bincount(codes, minlength=k).astype(float)
    centroids = np.stack([X[codes == c].mean(axis=0) for c in range(k)])
    within = float(sum(((X[codes == c] - centroids[c]) ** 2).sum() for c in range(k)))
    grand_mean = X.mean(axis=0)
    between = float((sizes * ((centroids - grand_mean) ** 2).sum(axis=1)).sum())
    return centroids, sizes, within, between


def _min_centroid_sqdist(centroids: np.ndarray) -> float:
    diffs = centroids[:, None, :] - centroids[None, :, :]
    sq = (diffs**2).sum(axis=-1)
    k = centroids.shape[0]
    return float(sq[~np.eye(k, dtype=bool)].min())


# --------------------------------------------------------------------------- cluster indices


def calinski_harabasz(X: ArrayLike, y: ArrayLike) -> float:
    """CHI = [B / (k - 1)] / [W / (n - k)]; higher = better separated. scikit-learn's implementation."""
    from sklearn.metrics import calinski_harabasz_score

    X, codes, classes = labelled_points(X, y)
    if X.shape[0] <= classes.size:
        raise ValueError(f"CHI needs more points than clusters (n={X.shape[0]}, k={classes.size})")
    return float(calinski_harabasz_score(X, codes))  # 1.0 for zero within-cluster spread, as sklearn


def xie_beni(X: ArrayLike, y: ArrayLike) -> float:
    """Hard-label Xie-Beni: W / (n * min_{i != j} ||c_i - c_j||^2); lower = better separated.

    ``W`` is the sum of squared distances of points to their own centroid. Coincident centroids
    give ``inf`` (no separation at all).
    """
    X, codes, classes = labelled_points(X, y)
    centroids, _, within, _ = class_scatter(X, codes, classes.size)
    min_sq = _min_centroid_sqdist(centroids)
    if min_sq == 0.0:
        return float("inf")
    return within / (X.shape[0] * min_sq)


def silhouette(X: ArrayLike, y: ArrayLike) -> float:
    """Mean silhouette coefficient (Euclidean), in [-1, 1]; scikit-learn's implementation."""
    from sklearn.metrics import silhouette_score

    X, codes, _ = labelled_points(X, y)
    return float(silhouette_score(X, codes, metric="euclidean"))


def davies_bouldin(X: ArrayLike, y: ArrayLike) -> float:
    """DB = mean_i max_{j != i} (s_i + s_j) / ||c_i - c_j||, s_i = mean distance to own centroid.

    Lower = better separated. scikit-learn's implementation (0.0 for coincident centroids).
    """
    from sklearn.metrics import davies_bouldin_score

    X, codes, _ = labelled_points(X, y)
    return float(davies_bouldin_score(X, codes))
