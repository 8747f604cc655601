"""Q2 as convergence: steps-to-level, GPU-seconds and the normalised AUC against hand computations."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from ecliptica.study.convergence import (
    convergence_tests,
    grit_twins,
    normalised_auc,
    run_convergence,
    steps_to_level,
    validation_curve,
)
from ecliptica.study.frontier_config import ConvergenceSection

ROWS = [
    {"step": 5, "loss": 0.7},  # a training row without validation: not on the curve
    {"step": 0, "val/pref_accuracy": 0.5, "val/loss": 0.69, "gpu_seconds": 0.0},
    {"step": 10, "val/pref_accuracy": 0.55, "val/loss": 0.66, "gpu_seconds": 5.0},
    {"step": 20, "val/pref_accuracy": 0.65, "val/loss": 0.60, "gpu_seconds": 10.0},
    {"step": 30, "val/pref_accuracy": 0.7, "val/loss": 0.58, "gpu_seconds": 15.0},
]


def test_steps_to_level_and_auc_by_hand():
    s = ConvergenceSection(level=0.6)
    curve = validation_curve(ROWS, s)
    assert [c["step"] for c in curve] == [0, 10, 20, 30]
    assert steps_to_level(curve, s) == (20.0, 10.0)  # first logged row at or above 0.6
    # trapezoids: (0.5+0.55)/2*10 + (0.55+0.65)/2*10 + (0.65+0.7)/2*10 = 18, over a range of 30 steps
    assert normalised_auc(curve) == pytest.approx(0.6)
    assert steps_to_level(curve, ConvergenceSection(level=0.75)) == (None, None)


def test_a_loss_reaches_its_level_from_above():
    s = ConvergenceSection(metric="val/loss", higher_is_better=False, level=0.62)
    curve = validation_curve(ROWS, s)
    assert steps_to_level(curve, s) == (20.0, 10.0)
    assert normalised_auc(curve) == pytest.approx(((0.69 + 0.66) * 5 + (0.66 + 0.60) * 5 + (0.60 + 0.58) * 5) / 30)


def test_twin_contrast_is_a_t_interval_over_paired_seeds(tmp_path):
    s = ConvergenceSection(level=0.6)
    runs = {}
    # GRIT reaches 0.6 at step 10 in seed 0, 20 in seed 1, 10 in seed 2; AdamW at 20, 30, 30
    for arm, reach in (("dpo", (20, 30, 30)), ("dpo_grit", (10, 20, 10))):
        for seed, at in enumerate(reach):
            rows = [
                {"step": st, "val/pref_accuracy": 0.7 if st >= at else 0.5, "gpu_seconds": st * 0.5}
                for st in (0, 10, 20, 30)
            ]
            path = tmp_path / f"{arm}-{seed}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            runs[(arm, 1e-5, seed)] = run_convergence(path, s)
    assert grit_twins(["baseline", "dpo", "dpo_grit", "sft"]) == [("dpo", "dpo_grit")]
    tests = {t["outcome"]: t for t in convergence_tests(runs, s)}
    diffs = np.array([-10.0, -10.0, -20.0])
    t = tests["convergence: steps_to_level"]
    assert t["estimate"] == pytest.approx(diffs.mean())
    assert t["p_value"] == pytest.approx(stats.ttest_1samp(diffs, 0.0).pvalue)
    ci = stats.t.interval(0.95, 2, loc=diffs.mean(), scale=stats.sem(diffs))
    assert (t["low"], t["high"]) == pytest.approx(ci)
    assert tests["convergence: gpu_seconds_to_level"]["estimate"] == pytest.approx(diffs.mean() * 0.5)

    # AUC: a curve at 0.5 until `at`, then 0.7, over steps 0..30: the trapezoid over the jump's 10-step interval
    def auc(at):
        steps = [0, 10, 20, 30]
        values = [0.7 if st >= at else 0.5 for st in steps]
        return sum((values[i] + values[i + 1]) / 2 * 10 for i in range(3)) / 30

    expected = np.mean([auc(g) - auc(a) for a, g in zip((20, 30, 30), (10, 20, 10))])
    assert tests["convergence: auc"]["estimate"] == pytest.approx(expected)


def test_a_seed_that_never_reaches_the_level_is_named():
    s = ConvergenceSection(level=0.9)
    runs = {
        (a, 1e-5, sd): {"steps_to_level": None, "gpu_seconds_to_level": None, "auc": 0.5 + sd / 100 + (a == "dpo") / 50}
        for a in ("dpo", "dpo_grit")
        for sd in (0, 1)
    }
    tests = {t["outcome"]: t for t in convergence_tests(runs, s)}
    assert not tests["convergence: steps_to_level"]["answerable"]
    assert "never reached the level" in tests["convergence: steps_to_level"]["reason"]
    assert tests["convergence: auc"]["answerable"] is False and "no spread" in tests["convergence: auc"]["reason"]
