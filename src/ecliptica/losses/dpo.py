"""DPO: sigmoid DPO (Rafailov et al. 2023) with optional label smoothing (conservative DPO)."""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from pydantic import Field

from .base import AlignmentLoss, ReferenceSettings, preference_metrics
from .layout import PAIRED


class DPOConfig(ReferenceSettings):
    name: Literal["dpo"] = "dpo"
    beta: float = Field(0.1, gt=0)
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)  # robust to label noise; 0.5 would make the loss flat


class DPOLoss(AlignmentLoss):
    config = DPOConfig
    layout = PAIRED
    order = 10

    @property
    def needs_reference(self):
        return True

    def __call__(self, s, progress=0.0):
        pc, pr = self.layout.split(s.logps)
        rc, rr = self.layout.split(s.ref_logps)
        z = self.cfg.beta * ((pc - rc) - (pr - rr))
        eps = self.cfg.label_smoothing
        losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
        loss = losses.mean()
        m = preference_metrics(self.cfg.beta, s.logps, s.ref_logps)
        m["loss/dpo"] = loss.detach()
        return loss, m
