"""Held-out preference accuracy and paired drift against hand computations on the tiny model.

The reference numbers come from plain, unpadded forwards of separately loaded models (base, and base
+ adapter through peft) with log-softmax in float64 and scipy's rel_entr for the KL: nothing of the
evaluator's batching, chunking or PolicyModel is reused.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import rel_entr

from ecliptica.data import PreferenceExample, TokenizeSettings, tokenize_pairs
from ecliptica.evaluation.config import DriftSection, PreferenceSection
from ecliptica.evaluation.drift import load_benign_pairs, paired_difference, run_drift
from ecliptica.evaluation.model_handle import ModelHandle
from ecliptica.evaluation.preference import preference_metrics, run_preference

from .test_embeddings import _tiny, save_adapter


def _pairs() -> list[PreferenceExample]:
    return [ex for ex in load_benign_pairs(category=None, limit=40)][::8]  # 5 pairs, mixed categories


def _hand_logprobs(model, prompt_ids, response_ids) -> np.ndarray:
    """float64 log-softmax rows at the positions predicting each response token: [len(response), V]."""
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    start = len(prompt_ids) - 1
    return torch.log_softmax(logits[start : start + len(response_ids)], -1).numpy()


def _hand_seq_logp(model, prompt_ids, response_ids) -> float:
    lp = _hand_logprobs(model, prompt_ids, response_ids)
    return float(sum(lp[k, t] for k, t in enumerate(response_ids)))


@pytest.fixture(scope="module")
def models(tiny_model_dir, tmp_path_factory):
    from peft import PeftModel

    adapter = save_adapter(tiny_model_dir, tmp_path_factory.mktemp("pref") / "adapter", b_scale=1.0)
    base, tok = _tiny(tiny_model_dir)
    tuned = PeftModel.from_pretrained(_tiny(tiny_model_dir)[0], str(adapter)).eval()
    handle = ModelHandle(_tiny(tiny_model_dir)[0], tok, str(tiny_model_dir))
    return handle, adapter, base, tuned, tok


def test_reward_accuracy_and_margin_equal_hand_computed_dpo_rewards(models, tmp_path):
    import json

    handle, adapter, base, tuned, tok = models
    pairs = _pairs()
    s = PreferenceSection(enabled=True, path="demo:preferences", beta=0.5, batch_size=2)
    handle.set_adapter(adapter)
    got = run_preference(handle, pairs, s, n_resamples=1000, progress=False, pairs_path=tmp_path / "pairs.jsonl")

    tps = tokenize_pairs(tok, pairs, "none", TokenizeSettings(1024, 512), progress=False).pairs
    rewards = []
    for tp in tps:
        r = [
            0.5 * (_hand_seq_logp(tuned, tp.prompt_ids, y) - _hand_seq_logp(base, tp.prompt_ids, y))
            for y in (tp.chosen_ids, tp.rejected_ids)
        ]
        rewards.append(r)
    rewards = np.array(rewards)
    margins = rewards[:, 0] - rewards[:, 1]
    assert got["n_pairs"] == 5
    assert got["reward_margin"] == pytest.approx(margins.mean(), rel=1e-4, abs=1e-6)
    assert got["reward_accuracy"] == pytest.approx((margins > 0).mean())
    per_pair = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]  # the frontier's
    assert [r["id"] for r in per_pair] == [p.row_id for p in pairs]
    assert [r["reward_margin"] for r in per_pair] == pytest.approx(margins.tolist(), rel=1e-4, abs=1e-5)
    assert [r["reward_win"] for r in per_pair] == list(margins > 0)
    assert got["rewards_chosen"] == pytest.approx(rewards[:, 0].mean(), rel=1e-4, abs=1e-6)
    logp_wins = [
        _hand_seq_logp(tuned, tp.prompt_ids, tp.chosen_ids) > _hand_seq_logp(tuned, tp.prompt_ids, tp.rejected_ids)
        for tp in tps
    ]
    assert got["logp_accuracy"] == pytest.approx(np.mean(logp_wins))
    ci = got["reward_margin_ci"]
    assert ci["low"] <= got["reward_margin"] <= ci["high"]

    handle.set_adapter(None)  # the base is its own reference: no implicit reward to compare
    base_out = run_preference(handle, pairs, s, progress=False)
    assert base_out["reward_accuracy"] is None and "reference" in base_out["note"]
    assert base_out["logp_accuracy"] == pytest.approx(
        np.mean(
            [
                _hand_seq_logp(base, tp.prompt_ids, tp.chosen_ids)
                > _hand_seq_logp(base, tp.prompt_ids, tp.rejected_ids)
                for tp in tps
            ]
        )
    )


def test_preference_metrics_known_answer_and_beta_scales_only_the_margin():
    logp_c, logp_r = np.array([-10.0, -12.0, -9.0, -20.0]), np.array([-11.0, -11.0, -15.0, -19.0])
    ref_c, ref_r = np.array([-10.5, -11.0, -10.0, -20.0]), np.array([-10.5, -11.0, -14.0, -20.0])
    # policy - reference: chosen [0.5, -1, 1, 0], rejected [-0.5, 0, -1, 1] -> margins/beta [1, -1, 2, -1]
    one = preference_metrics(logp_c, logp_r, ref_c, ref_r, 1.0, True, n_resamples=1000)
    two = preference_metrics(logp_c, logp_r, ref_c, ref_r, 2.0, True, n_resamples=1000)
    assert one["reward_accuracy"] == 0.5 and one["reward_margin"] == pytest.approx(0.25)
    assert two["reward_accuracy"] == 0.5 and two["reward_margin"] == pytest.approx(0.5)
    assert one["logp_accuracy"] == 0.5  # [-10 > -11, -12 > -11, -9 > -15, -20 > -19]


def test_drift_kl_and_paired_ratio_equal_hand_computation(models):
    handle, adapter, base, tuned, tok = models
    pairs = load_benign_pairs(limit=4)
    handle.set_adapter(adapter)
    got, records = run_drift(handle, pairs, DriftSection(batch_size=3), n_resamples=1000, progress=False)
    tps = tokenize_pairs(tok, pairs, "none", TokenizeSettings(1024, 512), progress=False).pairs
    kl, nll, base_nll, tokens = [], [], [], []
    for tp in tps:
        p, q = _hand_logprobs(tuned, tp.prompt_ids, tp.chosen_ids), _hand_logprobs(base, tp.prompt_ids, tp.chosen_ids)
        kl.append(rel_entr(np.exp(p), np.exp(q)).sum())
        nll.append(-sum(p[k, t] for k, t in enumerate(tp.chosen_ids)))
        base_nll.append(-sum(q[k, t] for k, t in enumerate(tp.chosen_ids)))
        tokens.append(len(tp.chosen_ids))
    total = sum(tokens)
    assert got["kl_mean_token"] == pytest.approx(sum(kl) / total, rel=1e-4)
    assert got["perplexity_ratio"] == pytest.approx(np.exp((sum(nll) - sum(base_nll)) / total), rel=1e-5)
    assert got["base_perplexity"] == pytest.approx(np.exp(sum(base_nll) / total), rel=1e-5)
    assert [r["kl"] for r in records] == pytest.approx(kl, rel=1e-4)
    for key, value in (("perplexity_ratio_ci", got["perplexity_ratio"]), ("kl_ci", got["kl_mean_token"])):
        assert got[key]["low"] <= value <= got[key]["high"]


def test_paired_difference_cancels_example_difficulty():
    rng = np.random.default_rng(0)
    hard = rng.gamma(2.0, 20.0, size=60)  # per-example NLL varies a lot
    tokens = rng.integers(5, 40, size=60)
    a = [{"id": str(i), "tokens": int(t), "nll": float(h + 0.05 * t)} for i, (h, t) in enumerate(zip(hard, tokens))]
    b = [{"id": str(i), "tokens": int(t), "nll": float(h)} for i, (h, t) in enumerate(zip(hard, tokens))]
    out = paired_difference(a, b[::-1])  # matched by id, not by order
    assert out["difference"] == pytest.approx(0.05)
    assert out["low"] == pytest.approx(0.05) and out["high"] == pytest.approx(0.05)  # same shift everywhere
    with pytest.raises(ValueError, match="same examples"):
        paired_difference(a, b[:-1])
