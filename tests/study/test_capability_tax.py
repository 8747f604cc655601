"""The alignment tax (baseline accuracy − arm accuracy), paired over questions, against a normal-approximation
reference; the capability section of the report; the TensorBoard scalar."""

import numpy as np
import pytest

from ecliptica.evaluation.summary import EvalSummary, summarize_eval
from ecliptica.study.capability import alignment_tax, capability_row, capability_section
from ecliptica.study.contrasts import StudyContext
from ecliptica.study.tb import eval_scalars


def _summary(correct: np.ndarray, qhash: str = "h") -> EvalSummary:
    k, n = int(correct.sum()), int(correct.size)
    bits = "".join("1" if c else "0" for c in correct)
    return EvalSummary(
        aqi={"value": 0.5},
        accuracy_mmlu={"rate": k / n, "low": 0.0, "high": 1.0, "n": n, "correct": bits, "questions_hash": qhash},
    )


def _ctx(arms: dict[str, EvalSummary]) -> StudyContext:
    by_arm = {
        a: {0: {"arm": a, "seed": 0, "method": a if a == "baseline" else "dpo", "eval": s}} for a, s in arms.items()
    }
    return StudyContext(by_arm, None, n_resamples=4000, seed=0, alpha=0.05)


def test_tax_is_the_paired_difference_with_a_normal_approximation_interval():
    rng = np.random.default_rng(1)
    base = rng.random(400) < 0.45
    arm = base.copy()
    flip = rng.choice(400, size=40, replace=False)  # the arm changes 40 answers, mostly losing them
    arm[flip[:32]] = False
    arm[flip[32:]] = True
    t = alignment_tax(_ctx({"baseline": _summary(base), "dpo": _summary(arm)}), "mmlu", "dpo")
    d = base.astype(float) - arm.astype(float)
    assert t["estimate"] == pytest.approx(d.mean())
    half = 1.96 * d.std(ddof=1) / np.sqrt(d.size)  # paired: only the changed questions vary
    assert t["low"] == pytest.approx(d.mean() - half, abs=0.01)
    assert t["high"] == pytest.approx(d.mean() + half, abs=0.01)
    # unpaired (independent arms) would be about three times wider here: pairing is what makes a tax visible
    unpaired = 1.96 * np.sqrt(base.var() / 400 + arm.var() / 400)
    assert t["high"] - t["low"] < 0.5 * 2 * unpaired


def test_no_tax_for_an_identical_arm_and_none_across_different_questions():
    base = np.arange(100) % 3 == 0
    same = alignment_tax(_ctx({"baseline": _summary(base), "dpo": _summary(base.copy())}), "mmlu", "dpo")
    assert same["estimate"] == 0.0 and same["low"] == 0.0 and same["high"] == 0.0
    other = alignment_tax(_ctx({"baseline": _summary(base), "dpo": _summary(base, "other")}), "mmlu", "dpo")
    assert not other["answerable"] and "different questions" in other["reason"]


def test_row_section_and_tensorboard_carry_the_accuracy():
    base, arm = np.arange(50) % 2 == 0, np.arange(50) % 5 == 0
    ctx = _ctx({"baseline": _summary(base), "dpo": _summary(arm)})
    rows = [{"arm": a, **capability_row(ctx, a)} for a in ("baseline", "dpo")]
    assert rows[1]["accuracy_mmlu"] == pytest.approx(0.2)
    assert rows[1]["alignment_tax_mmlu"] == pytest.approx(0.5 - 0.2)
    assert "alignment_tax_mmlu" not in rows[0]
    text = "\n".join(capability_section(rows))
    assert "| dpo | 0.200 [0.000, 1.000] | +0.300 [" in text and "| baseline | 0.500" in text
    assert capability_section([{"arm": "baseline"}]) == []
    assert eval_scalars(ctx.by_arm["dpo"][0]["eval"])["eval/accuracy_mmlu"] == pytest.approx(0.2)


def test_summary_reads_capability_from_eval_json():
    result = {
        "aqi": {"overall": {"aqi": 0.5, "n": 10}},
        "capability": {
            "openbookqa": {
                "accuracy": {"rate": 0.5, "correct": 2, "total": 4, "wilson_low": 0.15, "wilson_high": 0.85},
                "correct": "1010",
                "questions_hash": "abc",
            }
        },
    }
    s = summarize_eval(result)
    assert s.accuracy_openbookqa.rate == 0.5 and s.accuracy_openbookqa.low == 0.15 and s.accuracy_openbookqa.n == 4
    assert s.accuracy_openbookqa.correct == "1010" and s.accuracy_mmlu is None
