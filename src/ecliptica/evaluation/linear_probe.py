"""Linear probe: how well a held-out logistic regression tells the labels apart from the embeddings.

`out_of_fold_scores` gives every prompt a decision score from a model that never saw it;
`probe_auroc` is the ROC AUC of those scores; `ProbeAurocStat` is the same AUROC as a bootstrap
statistic (see `stats.bootstrap_ci`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ecliptica.evaluation.cluster_indices import encode_labels, labelled_points

__all__ = ["out_of_fold_scores", "probe_auroc", "auroc_rows", "ProbeAurocStat"]

ArrayLike = Any


def out_of_fold_scores(
    X: ArrayLike, y: ArrayLike, folds: int = 5, seed: int = 0, groups: ArrayLike | None = None
) -> np.ndarray:
    """Logistic-regression decision scores for every row, each from a model that never saw it.

    Stratified K folds (shuffled with ``seed``); features standardised inside each training fold
    (no test-fold statistics leak into the scaler). ``groups`` keeps equal ids in the same fold,
    which the bootstrap needs when a resample repeats a prompt.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, codes, classes = labelled_points(X, y)
    if classes.size != 2:
        raise ValueError(f"the probe is binary; got labels {classes.tolist()}")
    smallest = int(np.bincount(codes).min())
    if folds < 2 or folds > smallest:
        raise ValueError(f"folds={folds} needs 2 <= folds <= smallest class size ({smallest})")
    if groups is None:
        splits = StratifiedKFold(folds, shuffle=True, random_state=seed).split(X, codes)
    else:
        splits = StratifiedGroupKFold(folds, shuffle=True, random_state=seed).split(X, codes, groups)
    scores = np.empty(X.shape[0])
    for train, test in splits:
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
        model.fit(X[train], codes[train])
        scores[test] = model.decision_function(X[test])
    return scores


def probe_auroc(X: ArrayLike, y: ArrayLike, folds: int = 5, seed: int = 0) -> float:
    """ROC AUC of pooled out-of-fold linear-probe scores (positive class = the larger label)."""
    from sklearn.metrics import roc_auc_score

    codes, _ = encode_labels(y)
    return float(roc_auc_score(codes, out_of_fold_scores(X, y, folds, seed)))


def auroc_rows(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """AUROC of each row (Mann-Whitney U with average ranks for ties), vectorised over rows."""
    from scipy.stats import rankdata

    ranks = rankdata(scores, axis=1)
    n_pos = positive.sum(axis=1)
    n_neg = positive.shape[1] - n_pos
    rank_sum = (ranks * positive).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


class ProbeAurocStat:
    """Probe AUROC as a bootstrap statistic.

    ``refit=False`` (default, cheap): out-of-fold scores are computed once with ``folds`` folds on
    the full sample, and each resample recomputes only the AUROC of those fixed scores. This
    captures prompt-sampling variability of the evaluation but not probe-training variability.

    ``refit=True`` (slower, ~``refit_folds`` fits per resample): the probe is retrained on every
    resample with ``refit_folds`` stratified *group* folds, grouping copies of the same prompt so a
    duplicated prompt never sits in both train and test (which would inflate AUROC).
    """

    bounds = (0.0, 1.0)

    def __init__(self, folds: int = 5, seed: int = 0, refit: bool = False, refit_folds: int = 3):
        self.folds, self.seed, self.refit, self.refit_folds = folds, seed, refit, refit_folds

    def __call__(self, X: ArrayLike, y: ArrayLike) -> float:
        return probe_auroc(X, y, self.folds, self.seed)

    def on_resamples(self, X: ArrayLike, y: ArrayLike, idx: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        codes, _ = encode_labels(y)
        if self.refit:
            return np.array([self._refit_once(X, codes, rows) for rows in idx])
        scores = out_of_fold_scores(X, codes, self.folds, self.seed)
        return auroc_rows(scores[idx], codes[idx] == 1)

    def _refit_once(self, X: np.ndarray, codes: np.ndarray, rows: np.ndarray) -> float:
        scores = out_of_fold_scores(X[rows], codes[rows], self.refit_folds, self.seed, groups=rows)
        return float(auroc_rows(scores[None, :], (codes[rows] == 1)[None, :])[0])
