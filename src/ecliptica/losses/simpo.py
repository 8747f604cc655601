"""SimPO (Meng et al. 2024): reference-free; the reward is beta x the length-normalised log-prob, and the
chosen reward must beat the rejected one by a margin gamma:

    L = -log sigma(beta * (log pi(y+)/|y+| - log pi(y-)/|y-|) - gamma)

with optional label smoothing, as TRL's CPOTrainer computes it (`loss_type="simpo"`, `cpo_alpha=0`).
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from pydantic import Field

from .base import AlignmentLoss, MethodSettings, reward_metrics
from .layout import PAIRED


class SimPOConfig(MethodSettings):
    name: Literal["simpo"] = "simpo"
    beta: float = Field(2.0, gt=0)  # the paper uses 2.0-2.5 (rewards are per-token log-probs, so beta is larger)
    gamma: float = Field(1.0, ge=0)  # target reward margin; the paper recommends gamma/beta around 0.5
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)


class SimPOLoss(AlignmentLoss):
    config = SimPOConfig
    layout = PAIRED
    order = 40

    def __call__(self, s, progress=0.0):
        mc, mr = self.layout.split(s.mean_logps())
        z = self.cfg.beta * (mc - mr) - self.cfg.gamma
        eps = self.cfg.label_smoothing
        loss = (-(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)).mean()
        pc, pr = self.layout.split(s.logps)
        m = {"logps/chosen": pc.mean().detach(), "logps/rejected": pr.mean().detach(), "loss/simpo": loss.detach()}
        m.update(reward_metrics(self.cfg.beta * mc.detach(), self.cfg.beta * mr.detach()))
        return loss, m
