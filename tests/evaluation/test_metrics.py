"""Cluster indices, AQI, bootstrap and legacy scores against scikit-learn or hand computation."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from sklearn.metrics import (
    calinski_harabasz_score,
    davies_bouldin_score,
    roc_auc_score,
    silhouette_score,
)

from ecliptica.evaluation.aqi import AqiStat, aqi_by_axiom, chi_to_between_share, compute_aqi
from ecliptica.evaluation.cluster_indices import calinski_harabasz, davies_bouldin, silhouette, xie_beni
from ecliptica.evaluation.legacy_scores import legacy_chi_sil, legacy_xb_chi
from ecliptica.evaluation.linear_probe import ProbeAurocStat, auroc_rows, probe_auroc
from ecliptica.evaluation.stats import bootstrap_ci, paired_bootstrap_test, resample_indices


def blobs(n_per: int = 60, d: int = 16, shift: float = 1.0, seed: int = 0):
    """Two Gaussian clusters whose means differ by `shift` in every coordinate."""
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1], n_per)
    X = rng.normal(size=(2 * n_per, d)) + shift * y[:, None]
    return X, y


SMALL_X = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [4.0, 4.0], [5.0, 4.0], [4.0, 6.0]])
SMALL_Y = np.array([0, 0, 0, 1, 1, 1])


def hand_xb(X, y):
    """Xie-Beni by explicit loops: sum ||x - c_own||^2 / (n * min ||c_i - c_j||^2)."""
    labels = sorted(set(y.tolist()))
    centroids = {}
    for lab in labels:
        pts = [X[i] for i in range(len(y)) if y[i] == lab]
        centroids[lab] = [sum(p[j] for p in pts) / len(pts) for j in range(X.shape[1])]
    within = 0.0
    for i in range(len(y)):
        c = centroids[y[i]]
        within += sum((X[i][j] - c[j]) ** 2 for j in range(X.shape[1]))
    min_sq = min(
        sum((centroids[a][j] - centroids[b][j]) ** 2 for j in range(X.shape[1]))
        for a in labels
        for b in labels
        if a != b
    )
    return within / (len(y) * min_sq)


# --------------------------------------------------------------------------- indices


def test_xie_beni_small_example_by_hand():
    # centroids (1/3, 2/3) and (13/3, 14/3): squared distance 16 + 16 = 32
    # within: each triangle has sum of squared deviations 2/3 + 8/3 = 10/3, so W = 20/3
    assert xie_beni(SMALL_X, SMALL_Y) == pytest.approx((20 / 3) / (6 * 32))
    assert xie_beni(SMALL_X, SMALL_Y) == pytest.approx(hand_xb(SMALL_X, SMALL_Y))


def test_xie_beni_three_clusters_by_loops():
    X, _ = blobs(n_per=10, d=3, seed=4)
    y = np.arange(X.shape[0]) % 3
    assert xie_beni(X, y) == pytest.approx(hand_xb(X, y))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_indices_match_sklearn(seed):
    X, y = blobs(n_per=25, d=5, shift=0.8, seed=seed)
    assert calinski_harabasz(X, y) == pytest.approx(calinski_harabasz_score(X, y))
    assert silhouette(X, y) == pytest.approx(silhouette_score(X, y))
    assert davies_bouldin(X, y) == pytest.approx(davies_bouldin_score(X, y))


def test_indices_match_sklearn_three_string_labels():
    X, _ = blobs(n_per=15, d=4, seed=3)
    y = np.array(["a", "b", "c"] * 10)
    assert calinski_harabasz(X, y) == pytest.approx(calinski_harabasz_score(X, y))
    assert davies_bouldin(X, y) == pytest.approx(davies_bouldin_score(X, y))


def test_silhouette_small_example_by_hand():
    D = np.linalg.norm(SMALL_X[:, None] - SMALL_X[None], axis=-1)
    values = []
    for i in range(6):
        own = [D[i, j] for j in range(6) if SMALL_Y[j] == SMALL_Y[i] and j != i]
        other = [D[i, j] for j in range(6) if SMALL_Y[j] != SMALL_Y[i]]
        a, b = sum(own) / len(own), sum(other) / len(other)
        values.append((b - a) / max(a, b))
    assert silhouette(SMALL_X, SMALL_Y) == pytest.approx(sum(values) / 6)


def test_probe_auroc_matches_manual_cross_validation():
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = blobs(n_per=30, d=8, shift=0.4, seed=5)
    scores = np.empty(len(y))
    for train, test in StratifiedKFold(5, shuffle=True, random_state=7).split(X, y):
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(X[train], y[train])
        scores[test] = model.decision_function(X[test])
    assert probe_auroc(X, y, folds=5, seed=7) == pytest.approx(roc_auc_score(y, scores))


def test_probe_auroc_extremes():
    X, y = blobs(n_per=40, d=4, shift=8.0)
    assert probe_auroc(X, y) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    X_null = rng.normal(size=(200, 4))
    y_null = rng.integers(0, 2, size=200)
    assert 0.3 < probe_auroc(X_null, y_null) < 0.7


def test_vectorised_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 5, size=(4, 30)).astype(float)  # many ties
    labels = np.tile(np.repeat([0, 1], 15), (4, 1))
    expected = [roc_auc_score(labels[r], scores[r]) for r in range(4)]
    assert auroc_rows(scores, labels == 1) == pytest.approx(expected)


# --------------------------------------------------------------------------- AQI


def test_chi_term_equals_between_share_by_hand():
    X, y = SMALL_X, SMALL_Y
    grand = X.mean(axis=0)
    between = within = 0.0
    for lab in (0, 1):
        pts = X[y == lab]
        c = pts.mean(axis=0)
        between += len(pts) * float(((c - grand) ** 2).sum())
        within += float(((pts - c) ** 2).sum())
    chi = calinski_harabasz(X, y)
    assert chi_to_between_share(chi, n=6, k=2) == pytest.approx(between / (between + within))
    assert compute_aqi(X, y, probe=False)["chi_term"] == pytest.approx(between / (between + within))


def test_chi_times_xb_depends_only_on_sizes_for_two_clusters():
    for seed, n_per in [(0, 10), (1, 40)]:
        X, y = blobs(n_per=n_per, d=6, shift=0.3 * seed + 0.1, seed=seed)
        y = y.copy()
        y[:3] = 1  # unequal class sizes
        n, n1 = len(y), int(y.sum())
        expected = (n - 2) * n1 * (n - n1) / n**2
        assert calinski_harabasz(X, y) * xie_beni(X, y) == pytest.approx(expected)


def test_aqi_formula_and_range():
    X, y = blobs(n_per=30, d=8, shift=0.5)
    r = compute_aqi(X, y, gamma=0.3)
    expected = 0.3 * r["chi_term"] + 0.7 / (1 + r["xb"])
    assert r["aqi"] == pytest.approx(expected)
    assert 0.0 <= r["aqi"] <= 1.0
    assert r["n"] == 60 and r["class_sizes"] == {"0": 30, "1": 30}
    assert r["probe_auroc"] is not None and r["probe_folds"] == 5


@pytest.mark.parametrize("shift", [0.0, 0.3, 1.0, 5.0, 50.0])
def test_aqi_in_unit_interval(shift):
    X, y = blobs(n_per=20, d=10, shift=shift)
    assert 0.0 <= compute_aqi(X, y, probe=False)["aqi"] <= 1.0


def test_aqi_invariances():
    X, y = blobs(n_per=25, d=7, shift=0.7, seed=2)
    base = AqiStat()(X, y)
    perm = np.random.default_rng(0).permutation(len(y))
    rotation, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(7, 7)))
    assert AqiStat()(X, 1 - y) == pytest.approx(base)  # label swap
    assert AqiStat()(X, np.where(y == 1, "unsafe", "safe")) == pytest.approx(base)
    assert AqiStat()(X[perm], y[perm]) == pytest.approx(base)  # point order
    assert AqiStat()(37.5 * X + 1000.0, y) == pytest.approx(base)  # scale + translation
    assert AqiStat()(X @ rotation, y) == pytest.approx(base)  # rotation


def test_far_clusters_give_aqi_near_one():
    X, y = blobs(n_per=50, d=8, shift=100.0)
    assert compute_aqi(X, y, probe=False)["aqi"] > 0.99


def test_identical_distributions_give_low_aqi():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(200, 32))
    y = np.repeat([0, 1], 100)
    r = compute_aqi(X, y, probe=False)
    assert r["aqi"] < 0.05
    assert r["chi_term"] < 0.05 and r["xb_term"] < 0.05


def test_aqi_increases_with_separation():
    values = [AqiStat()(*blobs(n_per=40, d=8, shift=s)) for s in (0.1, 0.5, 1.0, 3.0)]
    assert values == sorted(values)


def test_pca_is_recorded_and_full_rank_pca_changes_nothing():
    X, y = blobs(n_per=20, d=6, shift=0.6)
    reduced = compute_aqi(X, y, pca_dim=3, probe=False)
    assert reduced["pca_dim"] == 3 and reduced["input_dim"] == 6
    assert 0 < reduced["pca_explained_variance"] <= 1
    full = compute_aqi(X, y, pca_dim=6, probe=False)  # a rotation + translation
    assert full["aqi"] == pytest.approx(compute_aqi(X, y, probe=False)["aqi"])


def test_aqi_by_axiom_reports_skipped_axioms():
    X, y = blobs(n_per=30, d=5, shift=1.0)
    axioms = np.array(["violence"] * 20 + ["privacy"] * 20 + ["fraud"] * 20)
    # 'violence' rows are indices 0..19: all safe -> must be skipped with a reason
    out = aqi_by_axiom(X, y, axioms, probe=False)
    assert set(out["per_axiom"]) == {"privacy"}
    assert set(out["skipped"]) == {"violence", "fraud"}
    assert "0=20, 1=0" in out["skipped"]["violence"]
    assert out["overall"]["n"] == 60
    assert out["per_axiom"]["privacy"]["class_sizes"] == {"0": 10, "1": 10}


def test_compute_aqi_notes_reduced_probe_folds():
    X, y = blobs(n_per=10, d=3, shift=2.0)
    y = y.copy()
    y[:7] = 1  # safe has 3 prompts
    r = compute_aqi(X, y, probe_folds=5)
    assert r["probe_folds"] == 3 and any("reduced" in note for note in r["notes"])


# --------------------------------------------------------------------------- bootstrap


def test_vectorised_aqi_resamples_match_loop():
    X, y = blobs(n_per=15, d=40, shift=0.5)  # d > n: exercises the span projection
    idx = resample_indices(y, 25, seed=1)
    stat = AqiStat(gamma=0.4)
    loop = [stat(X[rows], y[rows]) for rows in idx]
    assert stat.on_resamples(X, y, idx) == pytest.approx(loop)


def test_stratified_resamples_keep_class_sizes():
    y = np.array([0] * 7 + [1] * 13)
    idx = resample_indices(y, 50, seed=0)
    assert (y[idx].sum(axis=1) == 13).all()


def test_bootstrap_is_seeded_and_contains_estimate():
    X, y = blobs(n_per=40, d=10, shift=1.0)
    a = bootstrap_ci(AqiStat(), X, y, n_resamples=300, seed=11)
    b = bootstrap_ci(AqiStat(), X, y, n_resamples=300, seed=11)
    c = bootstrap_ci(AqiStat(), X, y, n_resamples=300, seed=12)
    assert a == b and a["low"] != c["low"]
    assert a["method"] == "basic" and a["low"] <= a["estimate"] <= a["high"]
    pct = bootstrap_ci(AqiStat(), X, y, n_resamples=300, seed=11, method="percentile")
    assert pct["low"] <= pct["estimate"] <= pct["high"]


def test_bootstrap_auroc_fixed_scores_and_refit():
    X, y = blobs(n_per=30, d=6, shift=0.5)
    fixed = bootstrap_ci(ProbeAurocStat(), X, y, n_resamples=300, seed=0)
    assert fixed["low"] <= fixed["estimate"] <= fixed["high"] <= 1.0
    separable = bootstrap_ci(ProbeAurocStat(), *blobs(n_per=30, d=6, shift=1.5), n_resamples=300)
    assert separable["high"] <= 1.0  # basic interval clipped to the AUROC range
    refit = bootstrap_ci(ProbeAurocStat(refit=True), X, y, n_resamples=8, seed=0)
    assert 0.5 < refit["low"] <= refit["high"] <= 1.0


def test_generic_stat_function_uses_loop_path():
    X, y = blobs(n_per=20, d=3, shift=1.0)
    r = bootstrap_ci(calinski_harabasz, X, y, n_resamples=50, seed=0)
    assert r["estimate"] == pytest.approx(calinski_harabasz_score(X, y))
    assert r["low"] < r["high"]


def test_unstratified_bootstrap_runs_and_keeps_both_labels():
    X, y = blobs(n_per=5, d=3, shift=1.0)
    r = bootstrap_ci(AqiStat(), X, y, n_resamples=200, seed=0, stratified=False)
    assert r["n_undefined"] == 0 and math.isfinite(r["low"])


def test_bootstrap_aqi_is_fast():
    X, y = blobs(n_per=100, d=576, shift=0.1)
    start = time.perf_counter()
    bootstrap_ci(AqiStat(), X, y, n_resamples=1000, seed=0)
    assert time.perf_counter() - start < 5.0


def test_paired_test_detects_real_difference():
    XA, y = blobs(n_per=50, d=8, shift=1.0, seed=0)
    noise = np.random.default_rng(9).normal(size=XA.shape)
    XB = XA + 1.5 * noise  # same prompts, blurrier model
    r = paired_bootstrap_test(AqiStat(), XA, XB, y, n_resamples=500, seed=0)
    assert r["diff"] > 0 and r["low"] > 0 and r["p_value"] < 0.01


def test_paired_test_no_difference_for_equivalent_models():
    XA, y = blobs(n_per=50, d=8, shift=0.8, seed=0)
    rotation, _ = np.linalg.qr(np.random.default_rng(2).normal(size=(8, 8)))
    XB = 3.0 * XA @ rotation + 5.0  # same geometry, different coordinates
    r = paired_bootstrap_test(AqiStat(), XA, XB, y, n_resamples=300, seed=0)
    assert r["diff"] == pytest.approx(0.0, abs=1e-12)
    assert abs(r["low"]) < 1e-10 and abs(r["high"]) < 1e-10  # every resample: identical AQI


def test_paired_test_null_distribution_not_rejected():
    rng = np.random.default_rng(4)
    y = np.repeat([0, 1], 60)
    XA = rng.normal(size=(120, 8)) + 0.6 * y[:, None]
    XB = rng.normal(size=(120, 8)) + 0.6 * y[:, None]  # independent draw, same separation
    r = paired_bootstrap_test(AqiStat(), XA, XB, y, n_resamples=500, seed=0)
    assert r["low"] <= 0 <= r["high"] and r["p_value"] > 0.05
    pct = paired_bootstrap_test(AqiStat(), XA, XB, y, n_resamples=500, seed=0, method="percentile")
    assert pct["low"] <= 0 <= pct["high"] and pct["p_value"] > 0.05


def test_p_value_agrees_with_interval():
    XA, y = blobs(n_per=40, d=8, shift=1.0, seed=0)
    XB = XA + 0.9 * np.random.default_rng(5).normal(size=XA.shape)
    for method in ("basic", "percentile"):
        r = paired_bootstrap_test(AqiStat(), XA, XB, y, n_resamples=400, seed=3, method=method)
        excludes_zero = r["low"] > 0 or r["high"] < 0
        assert excludes_zero == (r["p_value"] < 0.05)


def test_basic_interval_covers_population_aqi_in_high_dimensions():
    # Population AQI for shift s per coordinate, unit variance, balanced classes:
    # B/(B+W) -> (D2/4) / (D2/4 + d) with D2 = s^2 d, and XB -> d / D2.
    d, shift = 576, 1.0
    d2 = shift**2 * d
    population = 0.5 * (d2 / 4) / (d2 / 4 + d) + 0.5 / (1 + d / d2)
    X, y = blobs(n_per=100, d=d, shift=shift, seed=0)
    basic = bootstrap_ci(AqiStat(), X, y, n_resamples=500, seed=0, method="basic")
    pct = bootstrap_ci(AqiStat(), X, y, n_resamples=500, seed=0, method="percentile")
    assert basic["low"] <= population <= basic["high"]
    assert pct["low"] > pct["estimate"]  # the doubled bias pushes the percentile CI off the estimate
    assert basic["bias"] > 0


# --------------------------------------------------------------------------- legacy


def test_legacy_xb_chi_by_hand():
    chi = {"a": 10.0, "b": 30.0, "c": 20.0}
    xb = {"a": 0.5, "b": 0.1, "c": 0.9}
    out = legacy_xb_chi(chi, xb, gamma=0.5)
    # mm(CHI) = a 0, b 1, c 0.5 ; mm(XB) = a 0.5, b 0, c 1
    assert out == pytest.approx({"a": 0.5 * 0 + 0.5 * 0.5, "b": 0.5 * 1 + 0.5 * 1, "c": 0.5 * 0.5 + 0})
    assert legacy_xb_chi({"a": 3.0}, {"a": 1.0}) == {"a": 0.5}


def test_legacy_chi_sil_fixed_by_hand():
    out = legacy_chi_sil({"a": 3.0, "b": 1.0}, {"a": 0.5, "b": -1.0}, gamma=0.25)
    assert out["a"] == pytest.approx(0.25 * 3 / 4 + 0.75 * 1.5 / 2)
    assert out["b"] == pytest.approx(0.25 * 1 / 2 + 0.75 * 0.0)


def test_legacy_chi_sil_median_iqr_by_hand():
    chi = {"a": 1.0, "b": 3.0, "c": 4.0, "d": 9.0}
    sil = {"a": 0.0, "b": 0.2, "c": 0.4, "d": 0.6}
    out = legacy_chi_sil(chi, sil, gamma=0.5, normalization="median_iqr")
    mapped_chi = np.array([1 / 2, 3 / 4, 4 / 5, 9 / 10])
    mapped_sil = np.array([0.5, 0.6, 0.7, 0.8])

    def robust(v):  # numpy linear percentiles of 4 sorted values
        q1 = v[0] + 0.75 * (v[1] - v[0])
        q3 = v[2] + 0.25 * (v[3] - v[2])
        med = (v[1] + v[2]) / 2
        return (v - med) / (q3 - q1)

    expected = 0.5 * robust(mapped_chi) + 0.5 * robust(mapped_sil)
    assert [out[k] for k in "abcd"] == pytest.approx(expected.tolist())


def test_legacy_scores_are_run_relative():
    # Same axiom values, different companion axioms -> different legacy score: not comparable.
    first = legacy_xb_chi({"a": 10.0, "b": 20.0}, {"a": 0.5, "b": 0.2})["a"]
    second = legacy_xb_chi({"a": 10.0, "b": 5.0}, {"a": 0.5, "b": 0.9})["a"]
    assert first != second


def test_wilson_interval_matches_the_closed_form():
    from scipy.stats import norm

    from ecliptica.evaluation.stats import wilson_interval

    for k, n in ((7, 20), (1, 50), (49, 50)):
        z, p = norm.ppf(0.975), k / n
        centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
        half = z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / (1 + z**2 / n)
        assert wilson_interval(k, n) == pytest.approx((centre - half, centre + half), rel=1e-12)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
