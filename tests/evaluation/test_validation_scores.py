"""Held-out preference accuracy / margin and response KL, against dense per-sequence HF forwards."""

import sys
from pathlib import Path

import pytest
import torch

from ecliptica.evaluation.validation import preference_scores, response_kl
from ecliptica.train.policy import PolicyModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from train_helpers import dense_token_logps, tiny_peft, toy_pairs  # noqa: E402


def _dense(peft_model, pairs):
    """Per sequence [chosen..., rejected...]: summed response log-prob and per-token log-softmax rows."""
    with torch.no_grad():
        rows = dense_token_logps(peft_model, pairs)
    return torch.stack([lp.gather(-1, t[:, None]).sum() for lp, t in rows]), [lp for lp, _ in rows]


def test_accuracy_margin_and_kl_match_dense_forwards(tiny_model_dir):
    model = tiny_peft(tiny_model_dir, seed=0)
    pairs = toy_pairs(n=6, seed=0)
    beta = 0.3
    pol, pol_rows = _dense(model, pairs)
    with model.disable_adapter():
        ref, ref_rows = _dense(model, pairs)
    n = len(pairs)
    margin = beta * ((pol[:n] - ref[:n]) - (pol[n:] - ref[n:]))
    assert 0 < (margin > 0).sum() < n, "the toy adapter should order some pairs each way (else the test is weak)"

    got = preference_scores(PolicyModel(model, chunk_size=4), pairs, pad_token_id=2, beta=beta, batch_size=3)
    assert got["n_pairs"] == n
    assert got["rewards/accuracies"] == pytest.approx(float((margin > 0).float().mean()))
    assert got["rewards/margins"] == pytest.approx(float(margin.mean()), rel=1e-4, abs=1e-5)

    # KL on the chosen responses only: sum_v p (log p - log q) per response token, token-weighted mean
    kl = [(p.exp() * (p - q)).sum(-1) for p, q in zip(pol_rows[:n], ref_rows[:n])]
    want = float(torch.cat(kl).sum() / sum(len(k) for k in kl))
    got_kl = response_kl(PolicyModel(model, chunk_size=4), pairs, pad_token_id=2, batch_size=2)
    assert got_kl["kl_mean_token"] == pytest.approx(want, rel=1e-4)
    assert got_kl["n_response_tokens"] == sum(len(p.chosen_ids) for p in pairs)


def test_an_untrained_adapter_ties_every_pair(tiny_model_dir):
    """Negative control: adapter B = 0 means policy = base, so no pair is 'won' and KL is 0."""
    model = tiny_peft(tiny_model_dir, randomize_b=False)
    pairs = toy_pairs(n=4)
    got = preference_scores(PolicyModel(model), pairs, pad_token_id=2, beta=0.1)
    assert got["rewards/accuracies"] == 0.0 and got["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert response_kl(PolicyModel(model), pairs, pad_token_id=2)["kl_mean_token"] == pytest.approx(0.0, abs=1e-6)
