"""ORPO against TRL's ORPOTrainer odds-ratio loss on TRL's own length-normalised log-probs of the same token
ids, with the NLL of the chosen response from transformers' own cross-entropy; and a closed form near p = 1."""

import math
from types import SimpleNamespace

import pytest
import torch
from train_helpers import padded_batch, policy_stats, tiny_peft, toy_pairs

from ecliptica.losses.base import SequenceStats
from ecliptica.losses.orpo import ORPOConfig, ORPOLoss


def _trl(beta):
    return SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device="cpu"))


def test_orpo_matches_trl(tiny_model_dir):
    ORPOTrainer = pytest.importorskip("trl.experimental.orpo").ORPOTrainer
    model = tiny_peft(tiny_model_dir, seed=5)
    pairs = toy_pairs(3, seed=13)
    beta = 0.4
    ids, mask, labels = padded_batch(pairs)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        avg = ORPOTrainer.get_batch_logps(out.logits, labels, average_log_prob=True)
        or_losses, *_ = ORPOTrainer.odds_ratio_loss(_trl(beta), avg[:3], avg[3:])
        # NLL of the chosen responses only (TRL's ORPOTrainer also counts prompt tokens; the paper does not)
        nll = model(input_ids=ids[:3], attention_mask=mask[:3], labels=labels[:3]).loss
        ours, m = ORPOLoss(ORPOConfig(beta=beta))(policy_stats(model, pairs, ref=False))
    assert float(m["loss/nll"]) == pytest.approx(float(nll), rel=1e-5)
    assert float(ours) == pytest.approx(float(nll - or_losses.mean()), abs=1e-5)


def test_orpo_odds_ratio_closed_form_near_certainty():
    """Mean token log-probs close to 0, where log(1 - p) matters (the random tiny model never gets there)."""
    ORPOTrainer = pytest.importorskip("trl.experimental.orpo").ORPOTrainer
    n = torch.tensor([2, 4, 1, 2])
    lp = torch.tensor([-0.1, -0.2, -0.5, -3.0])  # means: chosen -0.05, -0.05; rejected -0.5, -1.5
    loss, m = ORPOLoss(ORPOConfig(beta=0.5))(SequenceStats(lp, n))
    odds = lambda mean: math.log(math.exp(mean) / (1 - math.exp(mean)))  # noqa: E731
    ratios = [odds(-0.05) - odds(-0.5), odds(-0.05) - odds(-1.5)]
    expected_or = sum(math.log(1 / (1 + math.exp(-r))) for r in ratios) / 2
    nll = 0.3 / 6  # chosen: -(-0.1 - 0.2) over 2 + 4 tokens
    assert float(loss) == pytest.approx(nll - 0.5 * expected_or, abs=1e-6)
    trl, *_ = ORPOTrainer.odds_ratio_loss(_trl(0.5), torch.tensor([-0.05, -0.05]), torch.tensor([-0.5, -1.5]))
    assert float(trl.mean()) == pytest.approx(0.5 * expected_or, abs=1e-6)
    assert float(m["log_odds_chosen"]) == pytest.approx(sum(ratios) / 2, abs=1e-6)
