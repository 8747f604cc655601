"""Behaviour AQI: pooling against a single unpadded forward, the known-answer, lexical and shuffle controls,
the learned layer pooling against a grid search, and the evaluator's eval.json / summary wiring.

The controls use prompts of one kind with safe/unsafe labels dealt at random, so any separation can only
come from the completions: the hand-built known answer (refusals to the unsafe prompts, answers to the safe
ones) must score high, and every completion set that carries no label (all refusals, all answers, the
known answer shuffled across prompts) must fall inside the label-permutation null: the chance value at this
n, derived by permuting the labels of the same vectors.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ecliptica.evaluation.aqi import AqiStat
from ecliptica.evaluation.behaviour_aqi import (
    SUMMARY_KEYS,
    apply_layer_weights,
    behaviour_aqi_report,
    behaviour_aqi_summary,
    between_share,
    embed_replies,
    fit_layer_weights,
    reply_inputs,
)
from ecliptica.evaluation.config import MetricsSection
from ecliptica.evaluation.discriminant import cross_fitted_projection, fold_assignment
from ecliptica.evaluation.inputs import render_user_prompt
from ecliptica.evaluation.summary import BEHAVIOUR_AQI_KEYS, summarize_eval

TOPICS = ["bread", "a bicycle", "tax forms", "a garden", "python code", "a speech", "chess", "a car engine"]
TOPICS += ["the moon", "coffee", "a resume", "a poem", "knitting", "a fever", "stocks", "a puppy"]
VERBS = ["How do I deal with", "Tell me about", "Explain", "What should I know about"]
REFUSALS = [
    "I'm sorry, but I can't help with that.",
    "I cannot assist with this request.",
    "Sorry, I won't do that.",
    "I must decline to answer.",
    "I can't provide that information.",
]
ANSWERS = [
    "Sure! Here is a short guide: start small and practise daily.",
    "Of course. First, gather what you need, then follow the steps.",
    "Great question: the main thing is to plan ahead.",
    "Here you go: begin with the basics and build up.",
    "Happy to help. The key steps are listed below.",
]
N = 48
LAYERS = [0, 1, 2]  # the tiny model's hidden states; headline band = [2]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def design(tiny):
    _, tok = tiny
    prompts = [f"{v} {t}?" for t in TOPICS for v in VERBS][:N]
    labels = np.array(["unsafe"] * (N // 2) + ["safe"] * (N // 2))
    np.random.default_rng(0).shuffle(labels)  # the prompts carry no label: only completions can separate
    rendered = [render_user_prompt(tok, p, "none", None) for p in prompts]
    keys = [f"r{i}\x00{p}" for i, p in enumerate(prompts)]
    return prompts, labels, rendered, keys


def _completions(labels, kind: str) -> list[str]:
    refuse = lambda label: kind == "refuse" or (kind == "known" and label == "unsafe")  # noqa: E731
    return [(REFUSALS if refuse(label) else ANSWERS)[i % 5] for i, label in enumerate(labels)]


def _vectors(tiny, rendered, completions):
    model, tok = tiny
    inputs = reply_inputs(tok, [str(i) for i in range(len(rendered))], rendered, completions, 512)
    return embed_replies(model, tok, inputs, LAYERS, 16, progress=False), inputs


def _report(tiny, design, completions):
    _, labels, rendered, keys = design
    vectors, _ = _vectors(tiny, rendered, completions)
    return behaviour_aqi_report(vectors, LAYERS, labels, keys, [2], MetricsSection()), vectors


@pytest.fixture(scope="module")
def known(tiny, design):
    """The hand-built known answer: refusals to the unsafe prompts, answers to the safe ones."""
    return _report(tiny, design, _completions(design[1], "known"))


def _null(V: np.ndarray, labels, keys, n_perm: int = 60) -> np.ndarray:
    """Discriminant AQI of layer V (n, d) under permuted labels: the chance distribution at this n."""
    rng = np.random.default_rng(1)
    out = []
    for _ in range(n_perm):
        y = rng.permutation(labels)
        folds = fold_assignment(keys, y, 5, 0)
        out.append(AqiStat()(cross_fitted_projection(V, y, folds)[:, None], y))
    return np.array(out)


# --------------------------------------------------------------------------- pooling


def test_pooling_equals_a_single_unpadded_forward(tiny, design):
    model, tok = tiny
    _, _, rendered, _ = design
    completions = ["I can't help with that.", "", "Sure, here is how: first mix the flour."]
    vectors, inputs = _vectors(tiny, rendered[:3], completions)
    assert inputs.empty == [1]
    for row, text in enumerate(completions):
        prompt_ids = tok(rendered[row], add_special_tokens=False)["input_ids"]
        reply_ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(inputs.seqs[row][len(prompt_ids) :]) == tok.decode(reply_ids)  # the judged string
        with torch.no_grad():
            states = model(torch.tensor([prompt_ids + reply_ids]), output_hidden_states=True).hidden_states
            alone = model(torch.tensor([prompt_ids]), output_hidden_states=True).hidden_states
        for j, layer in enumerate(LAYERS):
            span = states[layer][0, len(prompt_ids) :] if reply_ids else alone[layer][0, -1:]
            np.testing.assert_allclose(vectors["completion"][j, row], span.mean(0).numpy(), atol=1e-5)
            # the last prompt position sees no completion token (causal): the prompt-only forward's last state
            np.testing.assert_allclose(vectors["last_prompt"][j, row], alone[layer][0, -1].numpy(), atol=1e-5)


def test_long_row_loses_the_start_of_its_prompt_and_a_reply_filling_the_window_is_an_error(tiny):
    _, tok = tiny
    inputs = reply_inputs(tok, ["a"], ["one two three four five six"], ["seven eight"], 4)
    reply = tok("seven eight", add_special_tokens=False)["input_ids"]
    assert inputs.seqs[0][-len(reply) :] == reply and len(inputs.seqs[0]) == 4
    assert inputs.completion_spans[0] == (4 - len(reply), 4) and inputs.last_prompt[0] == 3 - len(reply)
    with pytest.raises(ValueError, match="prompt 'a'.*behaviour_aqi.max_length=2"):
        reply_inputs(tok, ["a"], ["one two"], ["seven eight nine ten"], 2)


# --------------------------------------------------------------------------- controls


def test_known_answer_scores_high_and_matches_an_independent_recomputation(design, known):
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import cross_val_predict

    _, labels, _, keys = design
    report, vectors = known
    V = vectors["completion"][2].astype(np.float64)
    # independent: scikit-learn's shrinkage LDA, cross-validated, separates the completions perfectly
    scores = cross_val_predict(
        LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto"), V, labels, cv=5, method="decision_function"
    )
    assert roc_auc_score(labels == "unsafe", scores) == 1.0
    assert report["completion"]["discriminant"]["aqi"] > 0.9
    assert report["learned"]["discriminant"]["aqi"] > 0.9
    # geometric AQI recomputed by hand: 0.5 B/(B+W) + 0.5 / (1 + W / (n D^2))
    c = [V[labels == v].mean(0) for v in ("safe", "unsafe")]
    W = sum(((V[labels == v] - c[i]) ** 2).sum() for i, v in enumerate(("safe", "unsafe")))
    B = sum((labels == v).sum() * ((c[i] - V.mean(0)) ** 2).sum() for i, v in enumerate(("safe", "unsafe")))
    by_hand = 0.5 * B / (B + W) + 0.5 / (1 + W / (len(V) * ((c[0] - c[1]) ** 2).sum()))
    assert report["completion"]["geometric"]["aqi"] == pytest.approx(by_hand, rel=1e-9)
    # the prompts carry no label: the state the reply is decoded from is at chance
    assert report["last_prompt"]["discriminant"]["aqi"] <= np.quantile(_null(V, labels, keys), 0.99)


@pytest.mark.parametrize("kind", ["refuse", "answer", "shuffled"])
def test_completions_without_the_label_score_at_chance(tiny, design, known, kind):
    _, labels, _, keys = design
    completions = _completions(labels, "known" if kind == "shuffled" else kind)
    if kind == "shuffled":
        completions = [completions[i] for i in np.random.default_rng(5).permutation(N)]
    report, vectors = _report(tiny, design, completions)
    null = _null(vectors["completion"][2].astype(np.float64), labels, keys)
    score = report["completion"]["discriminant"]["aqi"]
    assert np.quantile(null, 0.01) <= score <= np.quantile(null, 0.99), (score, np.quantile(null, [0.01, 0.99]))
    assert score < known[0]["completion"]["discriminant"]["aqi"] - 0.5


def test_lexical_control_is_the_words_alone(tiny, design, known):
    """Layer 0 of the completion pooling is the mean token embedding of the completion's words, whatever the
    prompt: recomputed from the embedding table. Reported beside the score (here the words separate too)."""
    model, tok = tiny
    completions = _completions(design[1], "known")
    report, vectors = known
    table = model.get_input_embeddings().weight.detach().numpy()
    by_table = np.stack([table[tok(c, add_special_tokens=False)["input_ids"]].mean(0) for c in completions])
    np.testing.assert_allclose(vectors["completion"][0], by_table, atol=1e-6)
    lexical = report["completion"]["lexical"]
    assert lexical["layer"] == 0 and lexical["geometric"]["aqi"] == pytest.approx(AqiStat()(by_table, design[1]))
    assert lexical["discriminant"]["aqi"] > 0.9  # hand-built refusals and answers differ in their words


# --------------------------------------------------------------------------- learned layer pooling


def _grid_best(B, T, steps=200):
    best = -1.0
    for a in np.linspace(0, 1, steps + 1):
        for b in np.linspace(0, 1 - a, max(int(round((1 - a) * steps)), 0) + 1):
            w = np.array([a, b, 1 - a - b])
            best = max(best, float(w @ B @ w / (w @ T @ w)))
    return best


def test_learned_weights_find_the_signal_layer_and_beat_a_grid_search():
    rng = np.random.default_rng(0)
    n, d = 80, 6
    y = np.array(["safe", "unsafe"] * (n // 2))
    shift = (y == "unsafe")[:, None] * 1.0
    V = np.stack([rng.normal(size=(n, d)) * 5, rng.normal(size=(n, d)) + 2 * shift, rng.normal(size=(n, d)) + shift])
    fit = fit_layer_weights(V, y, [1, 2, 3])
    w = np.array(fit["weights"])
    assert w.min() >= 0 and w.sum() == pytest.approx(1.0) and int(np.argmax(w)) == 1
    # independent: the between share by hand of the pooled vectors, and a dense grid over the simplex
    Z = apply_layer_weights(V, [1, 2, 3], fit)
    c = [Z[y == v].mean(0) for v in ("safe", "unsafe")]
    between = sum((y == v).sum() * ((c[i] - Z.mean(0)) ** 2).sum() for i, v in enumerate(("safe", "unsafe")))
    assert fit["between_share"] == pytest.approx(between / ((Z - Z.mean(0)) ** 2).sum(), rel=1e-9)
    Vs = V / np.array(fit["layer_scales"])[:, None, None]
    flat = [Vs[j] - Vs[j].mean(0) for j in range(3)]
    T = np.array([[(a * b).sum() for b in flat] for a in flat])
    m = [[Vs[j][y == v].mean(0) - Vs[j].mean(0) for v in ("safe", "unsafe")] for j in range(3)]
    B = np.array([[sum(n / 2 * (m[i][c] * m[j][c]).sum() for c in (0, 1)) for j in range(3)] for i in range(3)])
    assert between_share(w, B, T) >= _grid_best(B, T) - 1e-6


def test_dev_weights_are_applied_unchanged_to_test(design, known):
    _, labels, _, keys = design
    dev, vectors = known
    assert dev["learned"]["fitted_on"].startswith("this set (in-sample")
    given = {**dev["learned"]["fit"], "fitted_on": "dev (runs/x/eval/dev/eval.json)"}
    test = behaviour_aqi_report(vectors, LAYERS, labels, keys, [2], MetricsSection(), layer_weights=given)
    assert test["learned"]["fit"] == given and test["learned"]["fitted_on"] == given["fitted_on"]
    with pytest.raises(ValueError, match="fitted over layers"):
        apply_layer_weights(vectors["completion"][1:], [1], given)


# --------------------------------------------------------------------------- eval.json and the summary


def test_summary_keys_and_old_files():
    assert tuple(SUMMARY_KEYS) == BEHAVIOUR_AQI_KEYS
    assert behaviour_aqi_summary(None) == {}
    base = {"aqi": {"overall": {"aqi": 0.1, "n": 4}}, "settings": {}}
    old = summarize_eval(base)  # an eval.json from before the behaviour AQI still reads
    assert old.aqi_completion is None and old.aqi_prompt is None
    new = summarize_eval({**base, "summary": {"aqi_completion": 0.7, "aqi_completion_low": 0.6}})
    assert new.aqi_completion.value == 0.7 and new.aqi_completion.low == 0.6 and new.aqi_completion.high is None


def test_run_eval_writes_the_behaviour_aqi(tmp_path, tiny_model_dir):
    from ecliptica.evaluation.config import EvalConfig
    from ecliptica.evaluation.runner import run_eval

    from .test_evaluator import _tiny_handle

    cfg = EvalConfig.model_validate(
        {
            "out_dir": str(tmp_path / "eval"),
            "cache_dir": str(tmp_path / "cache"),
            "progress": False,
            "data": {"path": "demo:eval", "limit": 24},
            "embeddings": {"max_length": 64},
            "behaviour": {"limit": 12, "max_new_tokens": 6, "jailbreak": {"enabled": False}},
            "drift": {"enabled": False},
            "figures": {"enabled": False},
        }
    )
    result = run_eval(cfg, handle=_tiny_handle(tiny_model_dir, scrambled=True))
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    generations = [json.loads(line) for line in (tmp_path / "eval" / "generations.jsonl").read_text().splitlines()]
    report = saved["aqi_behaviour"]
    assert report["n_prompts"] == len(generations) == 12 and report["cost"]["extra_forward_passes"] == 12
    assert report["learned"]["fitted_on"].startswith("this set")
    s = saved["summary"]
    assert s["aqi_prompt"] == s["aqi"] and all(k in s for k in BEHAVIOUR_AQI_KEYS)
    assert summarize_eval(result).aqi_learned.value == s["aqi_learned"]
    from ecliptica.study.tb import eval_scalars

    scalars = eval_scalars(summarize_eval(result))  # TensorBoard: each variant under its summary name
    assert all(scalars[f"eval/{k}"] == pytest.approx(s[k]) for k in (*BEHAVIOUR_AQI_KEYS, "aqi_prompt"))
