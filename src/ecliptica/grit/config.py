"""Configuration for the GRIT optimizer (see docs/grit.md for the defaults table)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, Optional, Tuple


@dataclass
class GritConfig:
    # --- inner optimizer (receives the preconditioned gradients) ---
    inner: Literal["adamw", "sgd"] = "adamw"
    lr: float = 2e-5
    weight_decay: float = 0.0
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.0  # sgd only

    # --- K-FAC factors ---
    convention: Literal["kfac", "paper"] = "kfac"
    ema_decay: float = 0.95
    factor_update_steps: int = 1
    # Relative damping is scale-free: Sigma_g carries the loss reduction's 1/N^2
    # scale (and any fp16 loss scale), so an absolute lambda means different
    # things for different losses. The paper uses absolute 1e-3.
    damping: float = 1e-3
    damping_mode: Literal["relative", "absolute"] = "relative"
    max_damping_tries: int = 4  # Cholesky retries, damping x10 each
    precondition_warmup: int = 0  # optimizer steps before preconditioning starts
    # Gradients are averaged over data-parallel ranks (DDP/accelerate): rescale
    # the all-reduced Sigma_g by 1/world^2 so it matches the global-batch loss.
    ddp_grads_averaged: bool = True
    # "tokens" multiplies Sigma_g by N^2 (N = tokens in the step) to undo a
    # mean-reduced loss's 1/N on v, giving a per-token Fisher (use with inner="sgd").
    g_factor_scale: Literal["none", "tokens"] = "none"

    # --- Fisher-guided reprojection / rank adaptation ---
    reproject_steps: int = 50  # 0 disables reprojection
    reproject_warmup: int = 100
    reproject_rank: Optional[int] = None  # fixed k; None -> r (or adaptive)
    rank_adaptation: bool = True
    energy_threshold: float = 0.99
    min_rank: int = 4
    reproject_sides: Literal["two", "one"] = "two"

    # --- optional regularisers (authors' code; off by default) ---
    curvature_reg: float = 0.0  # paper: 1e-5
    subspace_reg: float = 0.0  # paper: 1e-4

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # yaml gives lists
        checks = {
            "inner": self.inner in ("adamw", "sgd"),
            "convention": self.convention in ("kfac", "paper"),
            "damping_mode": self.damping_mode in ("relative", "absolute"),
            "reproject_sides": self.reproject_sides in ("two", "one"),
            "g_factor_scale": self.g_factor_scale in ("none", "tokens"),
            "damping": self.damping >= 0.0,
            "ema_decay": 0.0 <= self.ema_decay < 1.0,
            "factor_update_steps": self.factor_update_steps >= 1,
            "max_damping_tries": self.max_damping_tries >= 1,
            "reproject_steps": self.reproject_steps >= 0,
            "energy_threshold": 0.0 < self.energy_threshold <= 1.0,
            "min_rank": self.min_rank >= 1,
            "reproject_rank": self.reproject_rank is None or self.reproject_rank >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid GritConfig fields: {bad} ({self})")

    def to_dict(self) -> dict:
        return asdict(self)
