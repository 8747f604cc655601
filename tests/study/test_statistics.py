"""Report statistics: Holm within a question, equivalence / inconclusive / different, seed signs,
AQI read with each run's recorded settings, and the across-seed fallback without embeddings."""

import numpy as np
import pytest
from scipy import stats

from ecliptica.evaluation.aqi import AqiStat
from ecliptica.evaluation.stats import holm_adjust, paired_bootstrap_test
from ecliptica.study.contrasts import AqiMismatchError, decide
from ecliptica.study.design import Contrast, Question
from ecliptica.study.report import build_report

N, DIM, R = 40, 8, 200


def test_holm_matches_a_hand_computation():
    # sorted: 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    assert holm_adjust([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm_adjust([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # 0.5 x 2 caps at 1, and the max carries over
    assert holm_adjust([0.04]) == [0.04]  # a family of one is not adjusted
    with pytest.raises(ValueError, match="must lie in"):
        holm_adjust([0.1, 1.2])


@pytest.mark.parametrize(
    "low, high, p_adj, expected",
    [
        (0.02, 0.05, 0.001, "different"),  # significant after correction
        (0.001, 0.004, 0.01, "different"),  # significant, even though inside the margin (flagged in the text)
        (-0.004, 0.006, 0.30, "equivalent"),  # not significant and the whole CI inside ±0.01
        (-0.02, 0.005, 0.30, "inconclusive"),  # CI reaches beyond -0.01
        (-0.01, 0.0, 0.90, "inconclusive"),  # touching the margin is not inside it
        (0.001, 0.009, 0.06, "equivalent"),  # CI excludes 0 but adjusted p > alpha: equivalence still holds
    ],
)
def test_decisions_on_constructed_intervals(low, high, p_adj, expected):
    assert decide(low, high, p_adj, 0.05, 0.01) == expected


def _emb(gap, seed):
    X = np.random.default_rng(seed).normal(size=(2 * N, DIM)).astype(np.float32)
    X[N:] += gap
    return X


def _record(tmp, arm, seed, X, gamma=0.5, with_embeddings=True, recorded=None):
    labels = np.array(["safe"] * N + ["unsafe"] * N)
    path = tmp / f"{arm}_{seed}.npz"
    np.savez(
        path,
        X=X,
        labels=labels,
        axioms=np.array(["a"] * labels.size),
        prompt_ids=np.array([f"p{i}" for i in range(labels.size)]),
    )
    value = float(AqiStat(gamma=gamma)(X, labels)) if recorded is None else recorded
    return {
        "arm": arm,
        "seed": seed,
        "method": "baseline" if arm == "baseline" else "dpo",
        "optimizer": None if arm == "baseline" else ("grit" if "grit" in arm else "adamw"),
        "placement": "none",
        "overrides": {},
        "train": None,
        "metrics_path": None,
        "embeddings_path": str(path) if with_embeddings else None,
        "eval": {
            "aqi": {"value": value},
            "aqi_gamma": gamma,
            "refusal_rate_unsafe": {"rate": 0.2, "n": N},
            "over_refusal_rate_safe": {"rate": 0.1, "n": N},
        },
    }


def _finding(out, qid, comparison, metric="AQI"):
    return next(f for f in out["questions"][qid]["findings"] if f["comparison"] == comparison and f["metric"] == metric)


def test_holm_is_applied_within_each_question_and_decides_significance(tmp_path):
    records = [
        _record(tmp_path, a, 0, _emb(g, s))
        for a, g, s in (("baseline", 0.1, 1), ("a", 0.9, 2), ("b", 0.6, 3), ("c", 0.15, 4))
    ]
    questions = [
        Question(
            id="Q",
            title="three contrasts",
            contrasts=[Contrast(terms={x: 1.0, "baseline": -1.0}, metrics=["aqi"]) for x in ("a", "b", "c")],
        )
    ]
    out = build_report(records, tmp_path / "out", n_resamples=R, questions=questions, figures=False)
    findings = out["questions"]["Q"]["findings"]
    raw = [f["p_value"] for f in findings]
    # Holm by its definition: the i-th smallest p times (m - i + 1), made monotone from the smallest up
    order = sorted(range(3), key=lambda i: raw[i])
    expected, running = [0.0] * 3, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (3 - rank) * raw[i]))
        expected[i] = running
    assert [f["p_holm"] for f in findings] == pytest.approx(expected)
    assert all(f["significant"] == (f["p_holm"] < 0.05) for f in findings)
    assert all(f["family_size"] == 3 for f in findings)
    assert "Holm-adjusted p" in findings[0]["text"]


def test_seed_sign_disagreement_is_reported(tmp_path):
    records = [_record(tmp_path, "baseline", 0, _emb(0.1, 1))]
    # seed 0: dpo_grit separates more than dpo; seed 1: the other way round
    for seed, (g_dpo, g_grit) in enumerate(((0.3, 0.8), (0.8, 0.3))):
        records += [
            _record(tmp_path, "dpo", seed, _emb(g_dpo, 10 + seed)),
            _record(tmp_path, "dpo_grit", seed, _emb(g_grit, 20 + seed)),
        ]
    out = build_report(records, tmp_path / "out", n_resamples=50, figures=False)
    f = _finding(out, "Q2", "dpo_grit − dpo")
    assert f["seeds_disagree"] and f["per_seed"]["0"] > 0 > f["per_seed"]["1"]
    assert "Seeds disagree in sign" in f["text"]
    same = _finding(out, "Q2", "dpo_grit − dpo", "refusal rate (unsafe)")  # negative control: identical rates
    assert not same["seeds_disagree"] and "Seeds disagree" not in same["text"]


def test_aqi_contrast_uses_each_runs_recorded_settings(tmp_path):
    records = [
        _record(tmp_path, "baseline", 0, _emb(0.1, 1), gamma=0.3),
        _record(tmp_path, "dpo", 0, _emb(0.7, 2), gamma=0.3),
    ]
    out = build_report(records, tmp_path / "out", n_resamples=R, figures=False)
    row = next(r for r in out["rows"] if r["arm"] == "dpo")
    labels = np.array(["safe"] * N + ["unsafe"] * N)
    ref = paired_bootstrap_test(AqiStat(gamma=0.3), _emb(0.7, 2), _emb(0.1, 1), labels, n_resamples=R, seed=0)
    assert (row["delta_aqi"], row["delta_aqi_low"], row["delta_aqi_high"]) == (ref["diff"], ref["low"], ref["high"])
    assert row["aqi"] == records[1]["eval"]["aqi"]["value"]  # read, not recomputed


def test_embeddings_that_do_not_reproduce_the_recorded_aqi_are_an_error(tmp_path):
    records = [
        _record(tmp_path, "baseline", 0, _emb(0.1, 1)),
        _record(tmp_path, "dpo", 0, _emb(0.7, 2), gamma=0.5, recorded=0.9),
    ]
    with pytest.raises(AqiMismatchError, match="arm 'dpo' seed 0.*recorded 0.900000"):
        build_report(records, tmp_path / "out", n_resamples=20, figures=False)


def test_different_aqi_settings_are_not_compared(tmp_path):
    records = [
        _record(tmp_path, "baseline", 0, _emb(0.1, 1), gamma=0.3),
        _record(tmp_path, "dpo", 0, _emb(0.7, 2), gamma=0.5),
    ]
    questions = [
        Question(id="Q", title="t", contrasts=[Contrast(terms={"dpo": 1.0, "baseline": -1.0}, metrics=["aqi"])])
    ]
    out = build_report(records, tmp_path / "out", n_resamples=20, figures=False, questions=questions)
    assert next(r for r in out["rows"] if r["arm"] == "dpo")["delta_aqi"] is None
    finding = _finding(out, "Q", "dpo − baseline")
    assert not finding["answerable"] and "AQI settings differ" in finding["reason"]


def test_without_embeddings_aqi_contrasts_are_t_intervals_over_seeds(tmp_path):
    records = [_record(tmp_path, "baseline", 0, _emb(0.1, 1), with_embeddings=False)]
    for seed in range(3):
        records += [
            _record(tmp_path, "dpo", seed, _emb(0.3 + 0.1 * seed, 10 + seed), with_embeddings=False),
            _record(tmp_path, "dpo_grit", seed, _emb(0.5, 20 + seed), with_embeddings=False),
        ]
    out = build_report(records, tmp_path / "out", n_resamples=50, figures=False)
    f = _finding(out, "Q2", "dpo_grit − dpo")
    aqi = {(r["arm"], r["seed"]): r["eval"]["aqi"]["value"] for r in records}
    diffs = np.array([aqi[("dpo_grit", s)] - aqi[("dpo", s)] for s in range(3)])
    low, high = stats.t.interval(0.95, 2, loc=diffs.mean(), scale=stats.sem(diffs))
    assert (f["estimate"], f["low"], f["high"]) == pytest.approx((diffs.mean(), low, high))
    assert f["p_value"] == pytest.approx(stats.ttest_1samp(diffs, 0.0).pvalue)
    assert "t-interval over seeds" in f["method"]
    one_seed = build_report(records[:3], tmp_path / "one", n_resamples=50, figures=False)
    assert not _finding(one_seed, "Q2", "dpo_grit − dpo")["answerable"]
    # identical seeds (e.g. deterministic arms) must give no p = 0 and no "significant" contrast from nothing
    same = [_record(tmp_path, "baseline", 0, _emb(0.1, 1), with_embeddings=False)]
    for seed in range(3):
        same += [
            _record(tmp_path, "dpo", seed, _emb(0.3, 10), with_embeddings=False),
            _record(tmp_path, "dpo_grit", seed, _emb(0.5, 20), with_embeddings=False),
        ]
    out = build_report(same, tmp_path / "same", n_resamples=50, figures=False)
    f = _finding(out, "Q2", "dpo_grit − dpo")
    assert not f["answerable"] and "same contrast" in f["reason"]
    row = next(r for r in out["rows"] if r["arm"] == "dpo")  # and its cell shows no [x, x] interval
    assert row["aqi_sd"] == 0.0 and row["aqi_low"] is None and row["aqi_high"] is None


def test_optional_section_hook_renders_only_when_it_has_content(tmp_path):
    records = [_record(tmp_path, "baseline", 0, _emb(0.1, 1)), _record(tmp_path, "dpo", 0, _emb(0.7, 2))]
    out = build_report(
        records,
        tmp_path / "out",
        n_resamples=20,
        figures=False,
        sections=[lambda by_arm: ["## Calibration", "", f"{len(by_arm)} arms"], lambda by_arm: None],
    )
    md = open(out["results_md"]).read()
    assert "## Calibration\n\n2 arms" in md and md.index("## Calibration") < md.index("## Research questions")


def test_grit_pairs_in_the_figure_come_from_the_registry_and_the_arms():
    """fig4 pairs every registered method the study ran with and without GRIT, in registry order, and nothing else."""
    from ecliptica.losses import registry
    from ecliptica.study.report import grit_paired_methods

    rows = [{"arm": a} for a in ("baseline", "ipo", "ipo_grit", "dpo", "dpo_grit", "cita", "sft_grit", "custom")]
    expected = [m for m in registry.method_names() if m in ("dpo", "ipo")]
    assert grit_paired_methods(rows) == expected and set(expected) == {"dpo", "ipo"}


def test_rate_draws_are_the_jeffreys_posterior():
    from ecliptica.study.contrasts import jeffreys_quantiles

    rng = np.random.default_rng(0)
    for k, n in ((0, 8), (3, 40), (40, 40)):
        draws = jeffreys_quantiles(k, n, rng.random(200_000))
        want = stats.beta.ppf([0.025, 0.5, 0.975], k + 0.5, n - k + 0.5)  # scipy's quantiles, not ours
        assert np.quantile(draws, [0.025, 0.5, 0.975]) == pytest.approx(want, abs=3e-3)
    with pytest.raises(ValueError, match="0 <= k <= n"):
        jeffreys_quantiles(9, 8, rng.random(10))


def _refusal_record(tmp, arm, refused, n):
    record = _record(tmp, arm, 0, _emb(0.3, 7))
    record["eval"]["refusal_rate_unsafe"] = {"rate": refused / n, "n": n}
    return record


def test_no_refusals_on_few_prompts_is_not_equivalence(tmp_path):
    # 0 of 8 refusals in both arms: the plug-in redraw gave [0, 0] and "equivalent"; 8 prompts cannot
    # show that two refusal rates differ by less than 0.05
    records = [_refusal_record(tmp_path, "baseline", 0, 8), _refusal_record(tmp_path, "dpo", 0, 8)]
    questions = [
        Question(
            id="Q",
            title="t",
            contrasts=[Contrast(terms={"dpo": 1.0, "baseline": -1.0}, metrics=["refusal_rate_unsafe"])],
        )
    ]
    out = build_report(records, tmp_path / "out", n_resamples=2000, questions=questions, figures=False)
    f = _finding(out, "Q", "dpo − baseline", "refusal rate (unsafe)")
    assert f["estimate"] == 0.0 and f["low"] < -0.1 and f["high"] > 0.1
    assert f["decision"] == "inconclusive"
    # positive control: 0 of 400 against 0 of 400 does establish a difference below 0.05
    many = [_refusal_record(tmp_path, "baseline", 0, 400), _refusal_record(tmp_path, "dpo", 0, 400)]
    out = build_report(many, tmp_path / "many", n_resamples=2000, questions=questions, figures=False)
    assert _finding(out, "Q", "dpo − baseline", "refusal rate (unsafe)")["decision"] == "equivalent"


def test_rate_difference_interval_covers_near_zero_rates():
    """Coverage by simulation: true refusal rates 8% and 0% on 40 prompts. The Jeffreys draws' 95% interval
    of the difference covers 0.08 about 95% of the time; the old plug-in redraw covered it ~80% of the time."""
    from ecliptica.study.contrasts import jeffreys_quantiles

    rng = np.random.default_rng(1)
    n, p1, sims, size = 40, 0.08, 400, 2000

    def coverage(draw):
        hits = 0
        for _ in range(sims):
            k1, k2 = rng.binomial(n, p1), 0
            low, high = np.quantile(draw(k1) - draw(k2), [0.025, 0.975])
            hits += low <= p1 <= high
        return hits / sims

    jeffreys = coverage(lambda k: jeffreys_quantiles(k, n, rng.random(size)))
    plug_in = coverage(lambda k: rng.binomial(n, k / n, size) / n)
    assert jeffreys >= 0.91 and plug_in <= 0.86  # binomial SE of a coverage over 400 studies: ~0.011


def _rate_ctx(by_arm_counts, n, seed=0, n_resamples=4000):
    """A StudyContext holding only refusal counts: {arm: [k per seed]} on n prompts."""
    from types import SimpleNamespace

    from ecliptica.study.contrasts import StudyContext

    by_arm = {
        arm: {
            s: {
                "method": "dpo",
                "train": {"steps": 1},
                "eval": SimpleNamespace(refusal_rate_unsafe=SimpleNamespace(rate=k / n, n=n)),
            }
            for s, k in enumerate(ks)
        }
        for arm, ks in by_arm_counts.items()
    }
    return StudyContext(by_arm=by_arm, aqi=None, n_resamples=n_resamples, seed=seed, alpha=0.05)


def test_identical_seeds_do_not_shrink_the_prompt_sampling_interval():
    """Three seeds scored on the same 40 prompts that refuse the same 12: there is one sample of prompts,
    so the arm's interval is one run's Jeffreys interval (scipy), not a third of its variance."""
    from ecliptica.study.table import seed_and_prompt_interval

    ctx = _rate_ctx({"dpo": [12, 12, 12]}, n=40)
    mean, sd, low, high = seed_and_prompt_interval(ctx, "dpo", "refusal_rate_unsafe")
    want = stats.beta.ppf([0.025, 0.975], 12.5, 28.5)
    assert mean == pytest.approx(0.3) and sd == 0.0
    assert (low, high) == pytest.approx(tuple(want), abs=0.01)  # the t-interval over seeds was [0.3, 0.3]
    # control: seeds that disagree widen it beyond any one run's interval
    _, _, low2, high2 = seed_and_prompt_interval(_rate_ctx({"dpo": [4, 12, 20]}, n=40), "dpo", "refusal_rate_unsafe")
    assert high2 - low2 > (want[1] - want[0]) + 0.05


def test_rate_contrast_over_seeds_on_shared_prompts_covers():
    """Coverage by simulation: two arms, three seeds each, all seeds scored on one sample of 40 prompts, the
    seeds agreeing (deterministic arms). The true difference is 0.35 - 0.20. Independent draws per seed
    treated the three seeds as three prompt samples and covered ~75% of the time; shared uniforms cover ~95%."""
    from ecliptica.study.contrasts import rate_contrast

    rng = np.random.default_rng(2)
    n, pa, pb, sims = 40, 0.35, 0.20, 300
    hits = 0
    for i in range(sims):
        ka, kb = rng.binomial(n, pa), rng.binomial(n, pb)
        ctx = _rate_ctx({"a": [ka] * 3, "b": [kb] * 3}, n=n, seed=i, n_resamples=1000)
        c = rate_contrast(ctx, "refusal_rate_unsafe", {"a": 1.0, "b": -1.0}, "a − b")
        hits += c["low"] <= pa - pb <= c["high"]
    assert hits / sims >= 0.92  # binomial SE of a coverage over 300 studies: ~0.013
