"""Optimizer and schedule from the config: AdamW, 8-bit AdamW (bitsandbytes), or GRIT around AdamW/SGD.

Beyond `torch.optim.Optimizer`, the engine talks to an optimizer only through `OptimizerHooks`. GRIT
implements them; plain optimizers get `NoHooks`, so the engine has no optimizer-specific branches.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Protocol

import torch


class OptimizerHooks(Protocol):
    def set_token_mask(self, mask: torch.Tensor | None) -> None:
        """Called before each micro-batch's forward with the batch's token mask (None: every token counts)."""

    def extra_losses(self) -> dict[str, torch.Tensor]:
        """Terms added to the micro-batch loss after the forward, logged under their names."""

    def metrics(self) -> dict[str, float]:
        """Scalars logged after each optimizer step."""

    def summary(self) -> dict[str, Any]:
        """Entries for the run's summary.json."""


class NoHooks:
    """What AdamW and 8-bit AdamW need from the seam: nothing."""

    def set_token_mask(self, mask):
        pass

    def extra_losses(self):
        return {}

    def metrics(self):
        return {}

    def summary(self):
        return {}


def build_optimizer(peft_model, cfg) -> tuple[torch.optim.Optimizer, OptimizerHooks]:
    o = cfg.optimizer
    params = [p for p in peft_model.parameters() if p.requires_grad]
    if o.name == "adamw":
        return torch.optim.AdamW(
            params, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas), eps=o.eps
        ), NoHooks()
    if o.name == "adamw8bit":
        if importlib.util.find_spec("bitsandbytes") is None:
            raise RuntimeError("optimizer adamw8bit needs bitsandbytes: pip install 'ecliptica[quant]'")
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(
            params, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas), eps=o.eps
        ), NoHooks()
    if o.name == "grit":
        from ..grit import GritOptimizer

        grit = GritOptimizer(peft_model, o.grit_config())
        return grit, grit
    raise ValueError(f"unknown optimizer {o.name!r}")


def build_scheduler(optimizer, cfg):
    from transformers import get_scheduler

    return get_scheduler(
        cfg.schedule.name, optimizer, num_warmup_steps=cfg.schedule.warmup_steps, num_training_steps=cfg.train.max_steps
    )
