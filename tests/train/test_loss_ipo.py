"""IPO against TRL's DPOTrainer(loss_type="ipo") on the same model and token ids, and a closed form."""

import pytest
import torch
from train_helpers import policy_stats, toy_pairs, trl_dpo_loss

from ecliptica.losses.base import SequenceStats
from ecliptica.losses.ipo import IPOConfig, IPOLoss


def test_ipo_matches_trl(tiny_model_dir, tmp_path):
    pairs = toy_pairs(3, seed=2)  # chosen and rejected of different lengths: the per-token averaging matters
    trl_loss, model = trl_dpo_loss(tiny_model_dir, tmp_path, pairs, beta=0.3, loss_type="ipo")
    with torch.no_grad():
        s = policy_stats(model, pairs)
        ours, _ = IPOLoss(IPOConfig(beta=0.3))(s)
    assert float(trl_loss) != pytest.approx((1 / 0.6) ** 2, rel=1e-3)  # policy != reference: a real comparison
    ratio = s.logps - s.ref_logps  # the 3 chosen, then the 3 rejected
    rc, rr = ratio[:3], ratio[3:]
    summed = float(((rc - rr - 1 / 0.6) ** 2).mean())  # without the per-token averaging: must differ
    assert float(trl_loss) != pytest.approx(summed, rel=1e-2)
    assert float(ours) == pytest.approx(float(trl_loss), abs=1e-5)


def test_ipo_closed_form_and_zero_at_the_target_margin():
    beta = 0.25  # target margin of the per-token log-ratios: 1 / (2 beta) = 2
    ref = torch.tensor([-6.0, -8.0, -6.0, -8.0])
    n = torch.tensor([2, 4, 3, 1])
    # pair 1: chosen ratio +4 over 2 tokens = 2, rejected 0 -> margin 2 = target: no loss
    # pair 2: chosen ratio 0, rejected -1 over 1 token -> margin 1, loss (1 - 2)^2 = 1
    lp = ref + torch.tensor([4.0, 0.0, 0.0, -1.0])
    loss, m = IPOLoss(IPOConfig(beta=beta))(SequenceStats(lp, n, ref))
    assert float(loss) == pytest.approx((0.0 + 1.0) / 2)
    assert float(m["rewards/accuracies"]) == 1.0
    with pytest.raises(ValueError, match="greater than 0"):
        IPOConfig(beta=0.0)
