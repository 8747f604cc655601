"""Optimizer and schedule from the config: AdamW, 8-bit AdamW (bitsandbytes), or GRIT around AdamW/SGD."""
from __future__ import annotations

import importlib.util

import torch


def build_optimizer(peft_model, cfg):
    o = cfg.optimizer
    params = [p for p in peft_model.parameters() if p.requires_grad]
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas), eps=o.eps)
    if o.name == "adamw8bit":
        if importlib.util.find_spec("bitsandbytes") is None:
            raise RuntimeError("optimizer adamw8bit needs bitsandbytes: pip install 'ecliptica[quant]'")
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas), eps=o.eps)
    if o.name == "grit":
        from ..grit import GritConfig, GritOptimizer

        gcfg = GritConfig(**{"lr": o.lr, "weight_decay": o.weight_decay, "betas": tuple(o.betas), "eps": o.eps,
                             **o.grit})
        return GritOptimizer(peft_model, gcfg)
    raise ValueError(f"unknown optimizer {o.name!r}")


def build_scheduler(optimizer, cfg):
    from transformers import get_scheduler

    return get_scheduler(cfg.schedule.name, optimizer, num_warmup_steps=cfg.schedule.warmup_steps,
                         num_training_steps=cfg.train.max_steps)
