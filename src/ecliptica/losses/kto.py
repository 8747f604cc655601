"""KTO (Ethayarajh et al. 2024): Kahneman-Tversky optimisation on unpaired responses, each desirable or undesirable.
The unpaired layout takes them from every pair's chosen and rejected response (TRL's `unpair_preference_dataset`).
With the log-ratio r = log pi(y|x) - log pi_ref(y|x) and the reference point z0:

    desirable:    desirable_weight   * (1 - sigma(beta * (r - z0)))
    undesirable:  undesirable_weight * (1 - sigma(beta * (z0 - r)))

averaged over the micro-batch's examples. z0 estimates KL(pi || pi_ref) from mismatched pairs: the micro-batch's mean
of log pi(y'|x) - log pi_ref(y'|x), y' being another example's completion, clamped at 0 and detached, as TRL's
KTOTrainer (loss_type="kto"). Because z0 is a mean over the micro-batch, the unpaired layout keeps micro-batches of
`micro_batch_size` examples (TRL's per-device batch) and never re-splits them by tokens. On several processes TRL
averages z0 over them; here each process estimates it from its own micro-batch.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from .base import AlignmentLoss, Ratio, ReferenceSettings
from .layout import UNPAIRED


class KTOConfig(ReferenceSettings):
    name: Literal["kto"] = "kto"
    beta: float = Field(0.1, gt=0)
    desirable_weight: float = Field(1.0, ge=0)  # raise it when desirable examples are the fewer (the paper's Eq. 8)
    undesirable_weight: float = Field(1.0, ge=0)


class KTOLoss(AlignmentLoss):
    config = KTOConfig
    layout = UNPAIRED
    order = 60

    @property
    def needs_reference(self):
        return True

    def __call__(self, s, progress=0.0):
        logps, mismatched = self.layout.split(s.logps)
        ref, ref_mismatched = self.layout.split(s.ref_logps)
        z0 = (mismatched - ref_mismatched).mean().detach().clamp(min=0)
        ratio = logps - ref
        desirable, beta = s.labels, self.cfg.beta
        losses = torch.where(
            desirable,
            self.cfg.desirable_weight * (1 - torch.sigmoid(beta * (ratio - z0))),
            self.cfg.undesirable_weight * (1 - torch.sigmoid(beta * (z0 - ratio))),
        )
        loss = losses.mean()
        # TRL's names; a micro-batch may hold no example of a kind, so the class means are Ratios over the step
        d, u = desirable.float(), (~desirable).float()
        rewards, lp = beta * ratio.detach(), logps.detach()
        m = {
            "loss/kto": loss.detach(),
            "kl": z0,
            "rewards/chosen": Ratio((rewards * d).mean(), d.mean()),
            "rewards/rejected": Ratio((rewards * u).mean(), u.mean()),
            "logps/chosen": Ratio((lp * d).mean(), d.mean()),
            "logps/rejected": Ratio((lp * u).mean(), u.mean()),
        }
        return loss, m
