"""CITA: instruction-conditioned contrastive alignment.

L = -log sigma(beta * (log pi(y+|I,X) - log pi(y-|I,X))) + lambda * KL, with the instruction I in the
prompt (system message by default). KL options:
  token_kl         exact KL(pi_theta || pi_ref) over the vocabulary, mean over response tokens of both
                   responses (>= 0; 0 when the adapter is zero).
  seq_logratio_sq  mean over sequences of (log pi(y) - log pi_ref(y))^2: the original plan's proxy (>= 0).
  seq_logratio     mean of the signed log-ratio, as the original code had it. It is unbounded below:
                   minimising it pushes log pi(y) -> -inf, which is how the original runs collapsed.
                   Refused unless `allow_unbounded_kl` is set, for reproducing old numbers only.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from .base import AlignmentLoss, ReferenceSettings, SequenceStats, preference_metrics
from .layout import PAIRED


class CITAConfig(ReferenceSettings):
    name: Literal["cita"] = "cita"
    beta: float = Field(0.1, gt=0)
    lambda_kl: float = Field(0.01, ge=0)  # weight of the KL term (at the start when annealed)
    lambda_kl_end: float | None = Field(None, ge=0)  # linear anneal to this value by the last step
    kl: Literal["token_kl", "seq_logratio_sq", "seq_logratio"] = "token_kl"
    length_normalize: bool = False  # mean instead of summed log-probs in the contrastive term
    allow_unbounded_kl: bool = False  # must be true to use the signed `seq_logratio` proxy

    @model_validator(mode="after")
    def _bounded_kl(self):
        if self.kl == "seq_logratio" and not self.allow_unbounded_kl:
            raise ValueError(
                "kl='seq_logratio' is the original code's signed proxy and is unbounded below "
                "(training collapses); set allow_unbounded_kl: true only to reproduce it"
            )
        return self


class CITALoss(AlignmentLoss):
    config = CITAConfig
    layout = PAIRED
    default_placement = "system"
    order = 20

    @property
    def needs_reference(self):
        return self.cfg.lambda_kl != 0 or (self.cfg.lambda_kl_end or 0) != 0

    @property
    def needs_token_kl(self):
        return self.needs_reference and self.cfg.kl == "token_kl"

    def lambda_at(self, progress: float) -> float:
        end = self.cfg.lambda_kl if self.cfg.lambda_kl_end is None else self.cfg.lambda_kl_end
        return self.cfg.lambda_kl + (end - self.cfg.lambda_kl) * min(max(progress, 0.0), 1.0)

    def kl_term(self, s: SequenceStats) -> torch.Tensor:
        if self.cfg.kl == "token_kl":
            return s.token_mean(s.token_kl_sum)
        ratio = s.logps - s.ref_logps
        return (ratio**2).mean() if self.cfg.kl == "seq_logratio_sq" else ratio.mean()

    def __call__(self, s, progress=0.0):
        logps = s.mean_logps() if self.cfg.length_normalize else s.logps
        pc, pr = self.layout.split(logps)
        contrastive = -F.logsigmoid(self.cfg.beta * (pc - pr)).mean()
        lam = self.lambda_at(progress)
        m = preference_metrics(self.cfg.beta, s.logps, s.ref_logps)
        loss = contrastive
        if self.needs_reference:
            kl = self.kl_term(s)
            loss = contrastive + lam * kl
            m["kl"] = kl.detach()
        m.update({"loss/contrastive": contrastive.detach(), "lambda_kl": torch.tensor(lam)})
        return loss, m
