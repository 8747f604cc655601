"""IPO (Azar et al. 2023): the squared loss that keeps the preference margin at 1/(2 beta) instead of pushing it
to infinity. As in TRL's DPOTrainer (`loss_type="ipo"`, confirmed with the IPO authors) the log-ratios are
averaged over each response's tokens, so beta means the same for short and long responses:

    L = ((log pi(y+)/pi0(y+)) / |y+| - (log pi(y-)/pi0(y-)) / |y-| - 1/(2 beta))^2
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import AlignmentLoss, ReferenceSettings, preference_metrics
from .layout import PAIRED


class IPOConfig(ReferenceSettings):
    name: Literal["ipo"] = "ipo"
    beta: float = Field(0.1, gt=0)  # tau in the paper: the target margin is 1/(2 beta)


class IPOLoss(AlignmentLoss):
    config = IPOConfig
    layout = PAIRED
    order = 30

    @property
    def needs_reference(self):
        return True

    def __call__(self, s, progress=0.0):
        ratio = (s.logps - s.ref_logps) / s.n_tokens.clamp(min=1)
        rc, rr = self.layout.split(ratio)
        loss = ((rc - rr - 1 / (2 * self.cfg.beta)) ** 2).mean()
        m = preference_metrics(self.cfg.beta, s.logps, s.ref_logps)
        m["loss/ipo"] = loss.detach()
        return loss, m
