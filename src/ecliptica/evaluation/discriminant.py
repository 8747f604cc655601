"""Discriminant-space AQI: each layer projected onto cross-fitted shrinkage-LDA directions (docs/aqi.md).

The geometric AQI measures how far apart the safe and unsafe clouds are next to the *total* spread
of a layer, most of which has nothing to do with safety (length, topic, template). Here each layer
is first reduced to the one direction that best separates the labels, learned on other prompts:

1. `fold_assignment`: k folds from a hash of (seed, prompt id, prompt text), stratified by label.
   It depends on the prompts only, so every model of a study is cross-fitted on the same folds.
2. `cross_fitted_projection`: for each fold, a shrinkage-LDA direction (`shrinkage_lda_direction`:
   pooled within-class covariance shrunk toward mu*I by the Ledoit-Wolf amount) is fitted on the
   other folds; the held-out prompts are projected on it, centred on the midpoint of the training
   class means and divided by the training within-class SD, so every fold is in the same units.
   No prompt is projected by a direction that saw it.
3. The fixed AQI maps (`aqi.AqiStat`) are applied to the 1-D held-out projections.

`headline_band` is the fixed rule for the headline: the mean over the last third of the decoder
layers. It is a property of the architecture only, decided before any result was seen.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ecliptica.evaluation.aqi import AqiStat

ArrayLike = Any


def headline_band(num_hidden_states: int) -> list[int]:
    """hidden_states indices of the last ceil(L/3) decoder layers (L = num_hidden_states - 1), at least one."""
    n_layers = num_hidden_states - 1
    if n_layers < 1:
        raise ValueError(f"a model with {num_hidden_states} hidden states has no decoder layer")
    width = max(1, math.ceil(n_layers / 3))
    return list(range(n_layers - width + 1, n_layers + 1))


HEADLINE_RULE = "mean over the last ceil(L/3) decoder layers (hidden_states L-ceil(L/3)+1 .. L)"


def fold_assignment(prompt_keys: Sequence[str], labels: ArrayLike, k: int, seed: int) -> np.ndarray:
    """Fold 0..k-1 per prompt: within each label, prompts ordered by sha256(seed, key) are dealt round-robin.

    Stratified (each fold holds ~1/k of every label) and a function of the prompts alone.
    """
    labels = np.asarray(labels)
    if len(prompt_keys) != labels.shape[0]:
        raise ValueError(f"{len(prompt_keys)} prompt keys for {labels.shape[0]} labels")
    digests = [hashlib.sha256(f"{seed}\x00{key}".encode()).hexdigest() for key in prompt_keys]
    folds = np.empty(labels.shape[0], dtype=np.int64)
    for value in np.unique(labels):
        members = np.flatnonzero(labels == value)
        order = sorted(members.tolist(), key=lambda i: (digests[i], i))
        folds[order] = np.arange(len(order)) % k
    return folds


def usable_folds(labels: ArrayLike, folds: int) -> int:
    """min(folds, smallest class): every fold must hold out at least one prompt of each label."""
    counts = np.unique(np.asarray(labels), return_counts=True)[1]
    if counts.size != 2 or counts.min() < 2:
        raise ValueError(f"the discriminant AQI needs two labels with >= 2 prompts each, got counts {counts.tolist()}")
    return int(min(folds, counts.min()))


def ledoit_wolf_shrinkage(Xc: np.ndarray) -> float:
    """Ledoit-Wolf shrinkage of the covariance of centred rows `Xc` toward mu*I (scikit-learn's formula).

    Uses whichever of `Xc'Xc` (d x d) and `Xc Xc'` (n x n) is smaller: both have the same trace and
    Frobenius norm, and sum_ij (X^2' X^2)_ij = sum_k ||x_k||^4. Equals
    `sklearn.covariance.ledoit_wolf_shrinkage(Xc, assume_centered=True)` (tested).
    """
    n, d = Xc.shape
    cross = Xc.T @ Xc if d <= n else Xc @ Xc.T
    row_sq = (Xc**2).sum(axis=1)
    mu = row_sq.sum() / n / d
    delta_ = float((cross**2).sum()) / n**2
    beta = (float((row_sq**2).sum()) / n - delta_) / (d * n)
    delta = (delta_ - 2.0 * mu * row_sq.sum() / n + d * mu**2) / d
    beta = min(beta, delta)
    return 0.0 if beta == 0 else beta / delta


def shrinkage_lda_direction(X: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """w = ((1 - a) S + a mu I)^-1 (m_1 - m_0): S the pooled within-class covariance, a its Ledoit-Wolf shrinkage.

    For wide hidden states (d > n) it is solved in the span of the class-centred rows (eigenvectors
    of their Gram matrix) plus the orthogonal complement, where S is 0 and the shrunk covariance is
    a*mu*I: exact, O(n^2 d) instead of O(d^3). The target is isotropic, so the direction turns with
    any rotation of the hidden states.
    """
    means = [X[codes == c].mean(axis=0) for c in (0, 1)]
    Xc = X - np.where((codes == 1)[:, None], means[1], means[0])
    n, d = Xc.shape
    shrink = ledoit_wolf_shrinkage(Xc)
    ridge = shrink * (Xc**2).sum() / n / d  # a * mu
    gap = means[1] - means[0]
    if d <= n:
        return np.linalg.solve((1 - shrink) * (Xc.T @ Xc) / n + ridge * np.eye(d), gap)
    lam, u = np.linalg.eigh(Xc @ Xc.T)  # lam = squared singular values of Xc
    keep = lam > max(lam.max(), 0.0) * 1e-10
    basis = (u[:, keep].T @ Xc) / np.sqrt(lam[keep])[:, None]  # orthonormal rows spanning Xc's rows
    inside = basis @ gap
    direction = basis.T @ (inside / ((1 - shrink) * lam[keep] / n + ridge))
    if ridge > 0:  # the complement of the span: the covariance there is ridge * I
        direction += (gap - basis.T @ inside) / ridge
    return direction


def cross_fitted_projection(X: ArrayLike, labels: ArrayLike, folds: np.ndarray) -> np.ndarray:
    """(n,) held-out LDA coordinates: positive toward the larger label, in training within-class SD units."""
    X = np.asarray(X, dtype=np.float64)
    codes = np.unique(np.asarray(labels), return_inverse=True)[1].reshape(-1)
    z = np.empty(X.shape[0])
    for fold in np.unique(folds):
        train, test = folds != fold, folds == fold
        direction = shrinkage_lda_direction(X[train], codes[train])
        seen = X[train] @ direction
        means = [seen[codes[train] == c].mean() for c in (0, 1)]
        resid = np.concatenate([seen[codes[train] == c] - means[c] for c in (0, 1)])
        sd = float(np.sqrt((resid**2).sum() / max(resid.size - 2, 1)))
        z[test] = (X[test] @ direction - (means[0] + means[1]) / 2) / (sd if sd > 0 else 1.0)
    return z


class BandAqiStat:
    """Mean AQI over a band of layers: X is (n, layers) projections or (n, layers, d) embeddings.

    A bootstrap statistic (vectorised through `AqiStat.on_resamples`): one set of prompt indices is
    applied to every layer of the band, so the interval is that of the band mean itself.
    """

    bounds = (0.0, 1.0)
    pca_dim = None  # never reduced: the band's projections are 1-D already

    def __init__(self, gamma: float = 0.5):
        self.gamma = gamma
        self.layer_stat = AqiStat(gamma)

    @staticmethod
    def _layers(X: np.ndarray) -> list[np.ndarray]:
        X = np.asarray(X, dtype=np.float64)
        return [X[:, j] if X.ndim == 3 else X[:, j : j + 1] for j in range(X.shape[1])]

    def __call__(self, X: ArrayLike, y: ArrayLike) -> float:
        return float(np.mean([self.layer_stat(layer, y) for layer in self._layers(X)]))

    def on_resamples(self, X: ArrayLike, y: ArrayLike, idx: np.ndarray) -> np.ndarray:
        return np.mean([self.layer_stat.on_resamples(layer, y, idx) for layer in self._layers(X)], axis=0)
