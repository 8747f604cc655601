"""What every method shares: the per-sequence statistics the engine hands a loss, the loss interface,
and the settings base every method's config model extends.

Every loss receives `SequenceStats` for a micro-batch laid out by its method's layout (`layout.py`: role by role,
e.g. [chosen_1..chosen_B, rejected_1..rejected_B] for pairs; `layout.split` hands the roles back) and returns
(loss, metrics). Log-probabilities are sums over response tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from pydantic import ConfigDict

from ..data.formatting import Placement
from ..strict import Strict
from .layout import PAIRED, Layout


@dataclass
class SequenceStats:
    """What the engine computed for one micro-batch (tensors on the model's device)."""

    logps: torch.Tensor  # [S] policy log p(response | prompt), summed over response tokens
    n_tokens: torch.Tensor  # [S] response tokens per sequence
    ref_logps: torch.Tensor | None = None  # [S] same under the reference (adapter disabled)
    token_kl_sum: torch.Tensor | None = None  # scalar: sum over response tokens of KL(pi_theta || pi_ref)
    seq_token_kl: torch.Tensor | None = None  # [S] the same sum per sequence, detached (evaluation reads it)
    nll_sum: torch.Tensor | None = None  # scalar: -sum of chosen-token log-probs (SFT)
    labels: torch.Tensor | None = None  # [B] the layout's per-example labels (unpaired: True = desirable)
    # What token means divide by (None: this micro-batch's response tokens). The engine sets it to the step's
    # response tokens x this micro-batch's share of examples, so a token mean is over the whole step however the
    # step's examples are split into micro-batches.
    token_denominator: float | None = None

    def token_mean(self, total: torch.Tensor) -> torch.Tensor:
        """`total` (summed over this micro-batch's response tokens) divided by the token denominator."""
        if self.token_denominator is None:
            return total / self.n_tokens.sum().clamp(min=1)
        return total / self.token_denominator

    def mean_logps(self) -> torch.Tensor:
        """[S] log-probs averaged over each sequence's response tokens (length-normalised)."""
        return self.logps / self.n_tokens.clamp(min=1)


@dataclass
class Ratio:
    """A metric that is a mean over only some of the examples (KTO's rewards/chosen: the desirable ones). A loss gives
    its micro-batch's means over all examples of `num` (e.g. reward x is-desirable) and `den` (is-desirable); the engine
    sums each over the step's micro-batches and processes, weighted by their share of examples, and logs num / den:
    the mean over every such example of the step, however it is split. A step without one logs no value."""

    num: torch.Tensor
    den: torch.Tensor


class MethodSettings(Strict):
    """Settings every method has. A method's config extends this with `name: Literal["<name>"]`."""

    # every method's numbers (beta, lambda, gamma, ...) must be finite; each field states its own range
    model_config = ConfigDict(allow_inf_nan=False)
    name: str  # each method narrows it to its own Literal name (the union's discriminator)
    placement: Placement | None = None  # None = the method's default


class ReferenceSettings(MethodSettings):
    """Settings of methods that compare the policy with the reference (the adapter disabled)."""

    precompute_reference: bool = False  # compute reference log-probs once and cache them on disk


class AlignmentLoss:
    """A method's loss. Subclasses declare `config` (their settings model, whose `name` is the method's
    name), `layout` (the sequences each example contributes) and what the engine must compute for them
    (`needs_reference`, `needs_token_kl`)."""

    config: ClassVar[type[MethodSettings]]
    name: ClassVar[str]  # set from the config's `name`
    layout: ClassVar[Layout]
    default_placement: ClassVar[Placement] = "none"
    order: ClassVar[int] = 100  # position in tables, figures and CLI choices (ties: by name)

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if "config" in cls.__dict__:
            cls.name = cls.config.model_fields["name"].default

    def __init__(self, cfg: MethodSettings):
        if not isinstance(cfg, self.config):
            raise TypeError(f"{type(self).__name__} takes a {self.config.__name__}, got {type(cfg).__name__}")
        self.cfg = cfg

    @property
    def needs_reference(self) -> bool:  # reference log-probs (adapter disabled, no grad)
        return False

    @property
    def needs_token_kl(self) -> bool:  # full-vocabulary KL at every response position
        return False

    def __call__(self, s: SequenceStats, progress: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError


def preference_metrics(beta: float, logps: torch.Tensor, ref: torch.Tensor | None) -> dict:
    """A paired micro-batch's metrics with TRL's names: logps/* always; rewards/* (beta x log-ratio to the
    reference) when there is one."""
    pc, pr = PAIRED.split(logps)
    m = {"logps/chosen": pc.mean().detach(), "logps/rejected": pr.mean().detach()}
    if ref is not None:
        rc, rr = PAIRED.split(ref)
        chosen_r, rejected_r = beta * (pc - rc).detach(), beta * (pr - rr).detach()
        m.update(reward_metrics(chosen_r, rejected_r))
    return m


def reward_metrics(chosen_r: torch.Tensor, rejected_r: torch.Tensor) -> dict:
    return {
        "rewards/chosen": chosen_r.mean(),
        "rewards/rejected": rejected_r.mean(),
        "rewards/margins": (chosen_r - rejected_r).mean(),
        "rewards/accuracies": (chosen_r > rejected_r).float().mean(),
    }
