"""SimPO against TRL's CPOTrainer SimPO loss on TRL's own length-normalised log-probs of the same token ids."""

import math
from types import SimpleNamespace

import pytest
import torch
from train_helpers import padded_batch, policy_stats, tiny_peft, toy_pairs

from ecliptica.losses.base import SequenceStats
from ecliptica.losses.simpo import SimPOConfig, SimPOLoss


def test_simpo_matches_trl(tiny_model_dir):
    CPOTrainer = pytest.importorskip("trl.experimental.cpo").CPOTrainer
    model = tiny_peft(tiny_model_dir, seed=3)
    pairs = toy_pairs(3, seed=11)  # chosen and rejected of different lengths
    beta, gamma, eps = 2.5, 1.2, 0.1
    ids, mask, labels = padded_batch(pairs)
    with torch.no_grad():
        avg = CPOTrainer.get_batch_logps(
            model(input_ids=ids, attention_mask=mask).logits, labels, average_log_prob=True
        )
        trl_self = SimpleNamespace(
            alpha=0.0,
            loss_type="simpo",
            beta=beta,
            simpo_gamma=gamma,
            label_smoothing=eps,
            accelerator=SimpleNamespace(device="cpu"),
        )
        trl_losses, trl_chosen_r, _ = CPOTrainer.cpo_loss(trl_self, avg[:3], avg[3:])
        s = policy_stats(model, pairs, ref=False)
        ours, m = SimPOLoss(SimPOConfig(beta=beta, gamma=gamma, label_smoothing=eps))(s)
    assert float(ours) == pytest.approx(float(trl_losses.mean()), abs=1e-5)
    assert float(m["rewards/chosen"]) == pytest.approx(float(trl_chosen_r.mean()), abs=1e-5)
    pc, pr = s.logps[:3], s.logps[3:]  # negative control: summed log-probs give another loss on these lengths
    summed = -torch.nn.functional.logsigmoid(beta * (pc - pr) - gamma).mean()
    assert float(trl_losses.mean()) != pytest.approx(float(summed), rel=1e-2)


def test_simpo_closed_form():
    # means: chosen -4/2 = -2, rejected -9/3 = -3; z = beta * 1 - gamma
    s = SequenceStats(torch.tensor([-4.0, -9.0]), torch.tensor([2, 3]))
    loss, _ = SimPOLoss(SimPOConfig(beta=2.0, gamma=0.5))(s)
    assert float(loss) == pytest.approx(math.log1p(math.exp(-1.5)), abs=1e-6)
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        SimPOConfig(gamma=-1.0)
