"""Alignment losses. A method = one small class here: its loss, the fields it uses, where its
instruction goes by default, and what the engine must compute for it (reference, token KL).

Every loss receives `SequenceStats` for a micro-batch laid out as [chosen_1..chosen_B, rejected_1..rejected_B]
(SFT: chosen only) and returns (loss, metrics). Log-probabilities are sums over response tokens only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from .data.formatting import Placement


@dataclass
class SequenceStats:
    """What the engine computed for one micro-batch (tensors on the model's device)."""

    logps: torch.Tensor  # [S] policy log p(response | prompt), summed over response tokens
    n_tokens: torch.Tensor  # [S] response tokens per sequence
    ref_logps: torch.Tensor | None = None  # [S] same under the reference (adapter disabled)
    token_kl_sum: torch.Tensor | None = None  # scalar: sum over response tokens of KL(pi_theta || pi_ref)
    seq_token_kl: torch.Tensor | None = None  # [S] the same sum per sequence, detached (evaluation reads it)
    nll_sum: torch.Tensor | None = None  # scalar: -sum of chosen-token log-probs (SFT)
    # What token means divide by (None: this micro-batch's response tokens). The engine sets it to the step's
    # response tokens x this micro-batch's share of pairs, so a token mean is over the whole step however the
    # step's pairs are split into micro-batches.
    token_denominator: float | None = None

    def token_mean(self, total: torch.Tensor) -> torch.Tensor:
        """`total` (summed over this micro-batch's response tokens) divided by the token denominator."""
        if self.token_denominator is None:
            return total / self.n_tokens.sum().clamp(min=1)
        return total / self.token_denominator

    def halves(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = x.shape[0] // 2
        return x[:b], x[b:]


@dataclass
class MethodConfig:
    name: str = "cita"
    beta: float = 0.1
    label_smoothing: float = 0.0  # DPO: conservative DPO / robust to label noise
    lambda_kl: float = 0.01  # CITA: weight of the KL term (at the start when annealed)
    lambda_kl_end: float | None = None  # CITA: linear anneal to this value by the last step
    kl: Literal["token_kl", "seq_logratio_sq", "seq_logratio"] = "token_kl"
    length_normalize: bool = False  # CITA: mean instead of summed log-probs in the contrastive term
    allow_unbounded_kl: bool = False  # must be true to use the signed `seq_logratio` proxy
    placement: Placement | None = None  # None = the method's default


class AlignmentLoss:
    name: ClassVar[str]
    uses_rejected: ClassVar[bool] = True
    uses_chosen: ClassVar[bool] = True
    default_placement: ClassVar[Placement] = "none"

    def __init__(self, cfg: MethodConfig):
        self.cfg = cfg

    @property
    def needs_reference(self) -> bool:  # reference log-probs (adapter disabled, no grad)
        return False

    @property
    def needs_token_kl(self) -> bool:  # full-vocabulary KL at every response position
        return False

    def __call__(self, s: SequenceStats, progress: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError


def _preference_metrics(beta: float, logps: torch.Tensor, ref: torch.Tensor | None, s: SequenceStats) -> dict:
    pc, pr = s.halves(logps)
    m = {"logps/chosen": pc.mean().detach(), "logps/rejected": pr.mean().detach()}
    if ref is not None:
        rc, rr = s.halves(ref)
        chosen_r, rejected_r = beta * (pc - rc).detach(), beta * (pr - rr).detach()
        m.update({"rewards/chosen": chosen_r.mean(), "rewards/rejected": rejected_r.mean(),
                  "rewards/margins": (chosen_r - rejected_r).mean(),
                  "rewards/accuracies": (chosen_r > rejected_r).float().mean()})
    return m


class SFTLoss(AlignmentLoss):
    """Negative log-likelihood of the chosen response tokens (completion-only; no prompt or padding)."""

    name = "sft"
    uses_rejected = False

    def __call__(self, s, progress=0.0):
        loss = s.token_mean(s.nll_sum)
        return loss, {"loss/nll": loss.detach(), "logps/chosen": s.logps.mean().detach()}


class DPOLoss(AlignmentLoss):
    """Sigmoid DPO (Rafailov et al. 2023) with optional label smoothing (cDPO)."""

    name = "dpo"

    @property
    def needs_reference(self):
        return True

    def __call__(self, s, progress=0.0):
        pc, pr = s.halves(s.logps)
        rc, rr = s.halves(s.ref_logps)
        z = self.cfg.beta * ((pc - rc) - (pr - rr))
        eps = self.cfg.label_smoothing
        losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
        loss = losses.mean()
        m = _preference_metrics(self.cfg.beta, s.logps, s.ref_logps, s)
        m["loss/dpo"] = loss.detach()
        return loss, m


class CITALoss(AlignmentLoss):
    """Instruction-conditioned contrastive alignment.

    L = -log sigma(beta * (log pi(y+|I,X) - log pi(y-|I,X))) + lambda * KL, with the instruction I in the
    prompt (system message by default). KL options:
      token_kl         exact KL(pi_theta || pi_ref) over the vocabulary, mean over response tokens of both
                       responses (>= 0; 0 when the adapter is zero).
      seq_logratio_sq  mean over sequences of (log pi(y) - log pi_ref(y))^2: the original plan's proxy (>= 0).
      seq_logratio     mean of the signed log-ratio, as the original code had it. It is unbounded below:
                       minimising it pushes log pi(y) -> -inf, which is how the original runs collapsed.
                       Refused unless `allow_unbounded_kl` is set, for reproducing old numbers only.
    """

    name = "cita"
    default_placement = "system"

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.kl == "seq_logratio" and not cfg.allow_unbounded_kl:
            raise ValueError("kl='seq_logratio' is the original code's signed proxy and is unbounded below "
                             "(training collapses); set allow_unbounded_kl: true only to reproduce it")
        if cfg.kl not in ("token_kl", "seq_logratio_sq", "seq_logratio"):
            raise ValueError(f"unknown CITA kl {cfg.kl!r}")

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
        return (ratio ** 2).mean() if self.cfg.kl == "seq_logratio_sq" else ratio.mean()

    def __call__(self, s, progress=0.0):
        logps = s.logps / s.n_tokens.clamp(min=1) if self.cfg.length_normalize else s.logps
        pc, pr = s.halves(logps)
        contrastive = -F.logsigmoid(self.cfg.beta * (pc - pr)).mean()
        lam = self.lambda_at(progress)
        m = _preference_metrics(self.cfg.beta, s.logps, s.ref_logps, s)
        loss = contrastive
        if self.needs_reference:
            kl = self.kl_term(s)
            loss = contrastive + lam * kl
            m["kl"] = kl.detach()
        m.update({"loss/contrastive": contrastive.detach(), "lambda_kl": torch.tensor(lam)})
        return loss, m


METHODS: dict[str, type[AlignmentLoss]] = {cls.name: cls for cls in (SFTLoss, DPOLoss, CITALoss)}


def get_method(name: str) -> type[AlignmentLoss]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
    return METHODS[name]


def build_loss(cfg: MethodConfig) -> AlignmentLoss:
    return get_method(cfg.name)(cfg)
