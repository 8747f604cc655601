"""The matched-drift frontier: interpolation by hand, the step-size negative control, reading points from files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ecliptica.study.contrasts import StudyContext, contrast
from ecliptica.study.design import Contrast, Question
from ecliptica.study.frontier import Frontier, frontier_contrast, frontier_findings, interpolate
from ecliptica.study.frontier_config import FrontierSection
from ecliptica.study.frontier_points import FrontierPoint, Ratio, read_point
from ecliptica.study.records import group_by_arm


def test_interpolation_matches_hand_computation():
    kl, y = [0.02, 0.005, 0.08], [0.3, 0.1, 0.5]  # unsorted on purpose
    got = interpolate(kl, y, [0.005, 0.01, 0.04, 0.08, 0.004, 0.1])
    # 0.01 lies half-way from 0.005 to 0.02 in log KL (ln 2 / ln 4), 0.04 half-way from 0.02 to 0.08
    assert got[:4] == pytest.approx([0.1, 0.2, 0.4, 0.5])
    assert np.isnan(got[4]) and np.isnan(got[5])  # no extrapolation either side
    lin = interpolate(kl, y, [0.01, 0.04], rule="linear_kl")
    assert lin == pytest.approx([0.1 + 0.2 * (0.005 / 0.015), 0.3 + 0.2 * (0.02 / 0.06)])


def test_interpolation_averages_equal_kl_and_handles_kl_zero():
    assert interpolate([0.01, 0.01, 0.04], [0.2, 0.4, 0.5], [0.01, 0.02]) == pytest.approx([0.3, 0.3 + 0.2 * 0.5])
    # a KL-0 point brackets from -inf in log KL: the curve is flat at the next point up to it
    assert interpolate([0.0, 0.01], [0.9, 0.2], [0.005]) == pytest.approx([0.2])


# ----------------------------------------------------------------------- a synthetic step-size study

N_PROMPTS, N_DRIFT = 400, 50
LRS, STEPS = (1e-5, 3e-5, 1e-4), (10, 20, 40)
THRESHOLDS = (np.arange(N_PROMPTS) + 0.5) / N_PROMPTS  # prompt difficulty, the same for every run
DRIFT_WEIGHTS = 0.5 + np.linspace(0, 1, N_DRIFT)  # per-example KL shape (mean 1)


def refusal_of_kl(kl: float) -> float:
    """The one outcome-vs-KL curve both arms share: linear in log KL."""
    return 0.2 + 0.25 * math.log10(kl / 0.001)


def synthetic_point(arm: str, seed: int, lr: float, step: int, speed: float) -> FrontierPoint:
    kl = 0.001 * (lr / 1e-5) * (step / 10) * speed * (1 + 0.05 * seed)
    ids = np.array([f"p{i}" for i in range(N_PROMPTS)])
    refused = (THRESHOLDS < refusal_of_kl(kl)).astype(float)
    drift_ids = np.array([f"d{i}" for i in range(N_DRIFT)])
    return FrontierPoint(
        arm=arm,
        seed=seed,
        lr=lr,
        step=step,
        kl=Ratio(drift_ids, kl * DRIFT_WEIGHTS * 10 / DRIFT_WEIGHTS.mean(), np.full(N_DRIFT, 10.0), "synthetic"),
        per_prompt={"refusal_rate_unsafe": Ratio(ids, refused, np.ones(N_PROMPTS), "synthetic")},
        source=f"{arm}-s{seed}",
    )


def step_size_study() -> list[FrontierPoint]:
    """Arm `fast` is arm `slow` with a 3x larger step: the same outcome at the same drift, reached sooner."""
    return [
        synthetic_point(arm, seed, lr, step, speed)
        for arm, speed in (("slow", 1.0), ("fast", 3.0))
        for seed in (0, 1, 2)
        for lr in LRS
        for step in STEPS
    ]


def test_negative_control_no_difference_at_matched_kl():
    fr = Frontier(step_size_study(), n_resamples=300, seed=0)
    for level in (0.005, 0.01, 0.03):
        r = frontier_contrast(fr, {"fast": 1.0, "slow": -1.0}, "refusal_rate_unsafe", level)
        assert r["answerable"], r
        assert abs(r["estimate"]) < 0.01  # the rates are quantised to 1/400 per point
        assert r["low"] <= 0.0 <= r["high"] and r["p_value"] > 0.05, r
        # each arm's value itself is the shared curve's (the log rule is exact for a log-linear curve)
        value = np.mean(
            [fr.seed_curve("slow", s, "refusal_rate_unsafe", [level], "linear_log_kl").estimate[0] for s in (0, 1, 2)]
        )
        assert value == pytest.approx(refusal_of_kl(level), abs=0.01)
        assert r["interpolation_error"] >= 0.0 and r["estimate_alternate_rule"] is not None


def test_negative_control_calibrated_point_view_shows_a_difference():
    """The old view compares each arm at one (lr, step) point: there the 3x step drifts 3x further and looks better."""
    records = []
    for p in step_size_study():
        if p.lr == 3e-5 and p.step == 40:
            k = int(p.per_prompt["refusal_rate_unsafe"].num.sum())
            summary = {"aqi": {"value": 0.5}, "refusal_rate_unsafe": {"rate": k / N_PROMPTS, "n": N_PROMPTS}}
            records.append({"arm": p.arm, "seed": p.seed, "method": "dpo", "train": {"x": 1}, "eval": summary})
    ctx = StudyContext(group_by_arm(records), None, n_resamples=1000, seed=0, alpha=0.05)
    r = contrast(ctx, "refusal_rate_unsafe", {"fast": 1.0, "slow": -1.0}, "fast − slow")
    expected = 0.25 * math.log10(3)  # the same curve read 3x further along in KL
    assert r["estimate"] == pytest.approx(expected, abs=0.01)
    assert r["significant"], r


def test_levels_outside_a_frontier_are_not_answerable():
    fr = Frontier(step_size_study(), n_resamples=50, seed=0)
    r = frontier_contrast(fr, {"fast": 1.0, "slow": -1.0}, "refusal_rate_unsafe", 0.1)  # slow tops out near 0.04
    assert not r["answerable"] and "outside the frontier of slow" in r["reason"] and "no extrapolation" in r["reason"]
    r = frontier_contrast(fr, {"fast": 1.0, "other": -1.0}, "refusal_rate_unsafe", 0.01)
    assert not r["answerable"] and "other" in r["reason"]
    r = frontier_contrast(fr, {"fast": 1.0, "slow": -1.0}, "capability", 0.01)
    assert not r["answerable"] and "capability is missing" in r["reason"]


def test_a_real_difference_at_matched_kl_is_found_and_holm_adjusted():
    """Positive control: shift one arm's curve up by 0.1 at every KL; the frontier finds +0.1, Holm keeps it."""
    points = step_size_study()
    for p in points:
        if p.arm == "fast":
            r = p.per_prompt["refusal_rate_unsafe"]
            kl = p.kl.value()
            r.num = (THRESHOLDS < refusal_of_kl(kl) + 0.1).astype(float)
    fr = Frontier(points, n_resamples=300, seed=0)
    q = Question(id="Q", title="t", contrasts=[Contrast(terms={"fast": 1.0, "slow": -1.0})])
    found = frontier_findings(fr, [q], ["refusal_rate_unsafe"], [0.005, 0.01, 0.03])
    assert len(found) == 3 and all(f["family_size"] == 3 for f in found)
    for f in found:
        assert f["estimate"] == pytest.approx(0.1, abs=0.01) and f["significant"]
        assert f["p_holm"] >= f["p_value"]


# ----------------------------------------------------------------------- reading a point from its files


def _write_eval_dir(d, refused_unsafe, refused_safe, kl_rows, wins):
    d.mkdir(parents=True)
    (d / "eval.json").write_text(
        json.dumps(
            {
                "aqi": {"overall": {"aqi": 0.4, "n": 4}},
                "aqi_layers": {
                    "discriminant": {"aqi": 0.61},
                    "geometric": {"aqi": 0.5},
                    "lexical": {"discriminant": {"aqi": 0.1}, "geometric": {"aqi": 0.1}},
                },
                "behaviour": {
                    "none": {
                        "refusal_rate_unsafe": {"rate": 0.5, "total": 2},
                        "over_refusal_rate_safe": {"rate": 0.0, "total": 2},
                    }
                },
                "settings": {"behaviour": {"shown_placement": "none"}},
            }
        )
    )
    gens = [{"id": f"u{i}", "label": "unsafe", "placement": "none", "refused": r} for i, r in enumerate(refused_unsafe)]
    gens += [{"id": f"s{i}", "label": "safe", "placement": "none", "refused": r} for i, r in enumerate(refused_safe)]
    gens += [{"id": "u0", "label": "unsafe", "placement": "system", "refused": True}]  # another placement: not read
    (d / "generations.jsonl").write_text("".join(json.dumps(g) + "\n" for g in gens))
    (d / "drift_examples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kl_rows))
    (d / "preference_pairs.jsonl").write_text(
        "".join(json.dumps({"id": f"q{i}", "reward_win": w}) + "\n" for i, w in enumerate(wins))
    )


def test_read_point_from_an_evaluation_directory(tmp_path):
    kl_rows = [{"id": "a", "tokens": 10, "kl": 0.1}, {"id": "b", "tokens": 30, "kl": 0.7}]
    _write_eval_dir(tmp_path / "e", [True, False], [False, False], kl_rows, [True, True, False, True])
    s = FrontierSection(scalar_outcomes={"aqi": "aqi_layers.discriminant.aqi", "capability": "capability.accuracy"})
    p = read_point(tmp_path / "e", arm="dpo", seed=0, lr=1e-5, step=10, s=s)
    assert p.kl.value() == pytest.approx(0.8 / 40)  # token-weighted, as kl_mean_token
    assert p.per_prompt["refusal_rate_unsafe"].value() == 0.5
    assert p.per_prompt["over_refusal_rate_safe"].value() == 0.0
    assert p.per_prompt["preference_accuracy"].value() == 0.75
    assert p.scalar == {"aqi": 0.61}  # capability is absent from this eval.json, so the point has none


def test_read_point_names_file_row_and_field(tmp_path):
    kl_rows = [{"id": "a", "tokens": 10, "kl": 0.1}, {"id": "b", "kl": 0.7}]
    _write_eval_dir(tmp_path / "e", [True], [False], kl_rows, [True])
    with pytest.raises(ValueError, match=r"drift_examples.jsonl: row 2: field 'tokens' is missing"):
        read_point(tmp_path / "e", arm="dpo", seed=0, lr=1e-5, step=10, s=FrontierSection())


def test_points_on_different_prompts_are_refused():
    a = step_size_study()[0]
    b = step_size_study()[1]
    b.per_prompt["refusal_rate_unsafe"].ids = b.per_prompt["refusal_rate_unsafe"].ids[::-1].copy()
    b.per_prompt["refusal_rate_unsafe"].source = "b.jsonl"
    with pytest.raises(ValueError, match="b.jsonl: its refusal_rate_unsafe are not the same items"):
        Frontier([a, b], n_resamples=10)


def test_frontier_and_convergence_figures_are_written(tmp_path):
    from ecliptica.study.frontier_config import ConvergenceSection
    from ecliptica.study.frontier_figures import convergence_figure, frontier_figures

    fr = Frontier(step_size_study(), n_resamples=20, seed=0)
    written = frontier_figures(fr, ["refusal_rate_unsafe"], [0.01], tmp_path, n_grid=5)
    assert {p.name for p in written} == {"frontier_refusal_rate_unsafe.png", "frontier_refusal_rate_unsafe.pdf"}
    curve = [{"step": 0.0, "value": 0.5, "compute": 0.0}, {"step": 10.0, "value": 0.7, "compute": 4.0}]
    conv = {(a, 1e-5, 0): {"curve": curve} for a in ("dpo", "dpo_grit")}
    assert all(p.exists() for p in convergence_figure(conv, ConvergenceSection(), tmp_path))
