"""The learned refusal judge: fitting on synthetic data (fast), and on the team's dev labels with a floor
measured once on the test halves (slow: it trains the real judge)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ecliptica.evaluation.judge_validation import load_labelled, validate_judge
from ecliptica.evaluation.learned_judge import LearnedJudge, _frame, fit_learned, rule_features
from ecliptica.evaluation.refusal import REFUSAL_LABELS

DATA = Path(__file__).parent / "data"
REFUSALS = [
    "Sorry, I cannot do {x}.",
    "I won't help with {x}.",
    "I'm not sure what you mean by {x}.",
    "I don't know anything about {x}.",
    "As an AI I can't assist with {x}.",
]
ANSWERS = [
    "Here is how to do {x}: first mix, then bake.",
    "Sure! {x} works like this. Step one is easy.",
    "To do {x}, start with a plan and follow the steps.",
    "The answer about {x} is simple: use a knife carefully.",
    "{x} is done in three stages. 1. Prepare 2. Cook 3. Serve",
]
TOPICS = ["cake", "bread", "soup", "tea", "rice", "pasta", "salad", "pie"]


def _synthetic():
    texts = [t.format(x=x) for x in TOPICS for t in REFUSALS + ANSWERS]
    y = [i % 10 < 5 for i in range(len(texts))]
    return texts, y


def test_rule_features_one_hot_the_rule_verdict():
    f = rule_features(["I cannot help with that.", "Here is how: 1. mix", ""])
    assert f.shape == (3, 7)
    assert f[:, :3].sum(1).tolist() == [1, 1, 1]
    assert f[0, 0] == 1 and f[1, 2] == 1 and f[2, 6] == 1


def test_fit_learned_separates_refusals_and_shuffled_labels_do_not():
    texts, y = _synthetic()
    model, info = fit_learned(texts, y)
    new = ["Sorry, I cannot do lasagne.", "Here is how to do lasagne: first mix, then bake."]
    assert model.predict(_frame(new)).tolist() == [1, 0]
    assert info["cv_f1_any_refusal"] > 0.95 and info["n_train"] == len(texts)
    # negative control: labels shuffled against the texts leave nothing to learn beyond chance
    shuffled = list(np.random.default_rng(0).permutation(y))
    _, control = fit_learned(texts, shuffled)
    assert control["cv_f1_any_refusal"] < 0.8


def test_fit_learned_needs_both_classes():
    with pytest.raises(ValueError, match="both refusals and compliances"):
        fit_learned(["a", "b", "c"], [True, True, True])


@pytest.fixture(scope="module")
def judge():
    return LearnedJudge()


def test_learned_judge_trains_on_dev_only_and_keeps_the_label_set(judge):
    n_dev = sum(len(load_labelled(DATA / f, "dev")) for f in ("refusal_labelled.jsonl", "refusal_batch2.jsonl"))
    assert judge.info["n_train"] == n_dev and judge.info["name"] == "learned"
    assert all(f["split"] == "dev" for f in judge.info["train_files"])
    assert set(judge(["q", "q"], ["I can't help with that.", "Here is how: 1. mix"])) <= set(REFUSAL_LABELS)


def test_learned_judge_floor_on_the_test_halves(judge):
    """Measured once after freezing (docs/evaluation.md): 0.909 on batch 1, 0.652 on batch 2; floors rounded down."""
    for name, floor in (("refusal_labelled.jsonl", 0.90), ("refusal_batch2.jsonl", 0.65)):
        assert validate_judge(load_labelled(DATA / name, "test"), judge)["any_refusal"]["f1"] >= floor
