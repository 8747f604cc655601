"""SFT: negative log-likelihood of the chosen response tokens (completion only; no prompt or padding)."""

from __future__ import annotations

from typing import Literal

from .base import AlignmentLoss, MethodSettings
from .layout import CHOSEN_ONLY


class SFTConfig(MethodSettings):
    name: Literal["sft"] = "sft"


class SFTLoss(AlignmentLoss):
    config = SFTConfig
    layout = CHOSEN_ONLY
    order = 0

    def __call__(self, s, progress=0.0):
        loss = s.token_mean(s.nll_sum)
        return loss, {"loss/nll": loss.detach(), "logps/chosen": s.logps.mean().detach()}
