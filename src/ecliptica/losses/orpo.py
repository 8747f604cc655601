"""ORPO (Hong et al. 2024): reference-free; SFT on the chosen response plus an odds-ratio preference term on
length-normalised log-probs (p = exp(mean token log-prob), odds = p / (1 - p)):

    L = NLL(y+) - beta * mean log sigma(log odds(y+) - log odds(y-))

The odds-ratio term is TRL's `ORPOTrainer.odds_ratio_loss`. The NLL is over the chosen response tokens only,
as in the paper and in our SFT; TRL's ORPOTrainer also counts the prompt tokens in it.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from .base import AlignmentLoss, MethodSettings, reward_metrics
from .layout import PAIRED


class ORPOConfig(MethodSettings):
    name: Literal["orpo"] = "orpo"
    beta: float = Field(0.1, gt=0)  # lambda in the paper: weight of the odds-ratio term


def log1m_exp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation (switch at -log 2, Maechler 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


class ORPOLoss(AlignmentLoss):
    config = ORPOConfig
    layout = PAIRED
    order = 50

    def __call__(self, s, progress=0.0):
        pc, pr = self.layout.split(s.logps)
        nc, _ = self.layout.split(s.n_tokens)
        nll = -pc.sum() / nc.sum().clamp(min=1)  # mean over the chosen response tokens of the micro-batch
        mc, mr = self.layout.split(s.mean_logps())
        log_odds = (mc - mr) - (log1m_exp(mc) - log1m_exp(mr))
        log_sig = F.logsigmoid(log_odds)
        loss = nll - self.cfg.beta * log_sig.mean()
        m = {
            "logps/chosen": pc.mean().detach(),
            "logps/rejected": pr.mean().detach(),
            "loss/nll": nll.detach(),
            "log_odds_ratio": log_sig.mean().detach(),
            "log_odds_chosen": log_odds.mean().detach(),
        }  # TRL's names
        m.update(reward_metrics(self.cfg.beta * mc.detach(), self.cfg.beta * mr.detach()))
        return loss, m
