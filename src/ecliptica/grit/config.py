"""Configuration for the GRIT optimizer (see docs/grit.md for the defaults table).

One Pydantic model: a run config's `optimizer.grit` block is validated against it when the config
loads, and the same model is what `GritOptimizer` receives.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..strict import Strict


class GritConfig(Strict):
    # --- inner optimizer (receives the preconditioned gradients) ---
    inner: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(2e-5, ge=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)  # yaml lists become tuples
    eps: float = Field(1e-8, gt=0.0)
    momentum: float = Field(0.0, ge=0.0)  # sgd only

    # --- K-FAC factors ---
    convention: Literal["kfac", "paper"] = "kfac"
    ema_decay: float = Field(0.95, ge=0.0, lt=1.0)
    factor_update_steps: int = Field(1, ge=1)
    # Relative damping is scale-free: Sigma_g carries the loss reduction's 1/N^2
    # scale (and any fp16 loss scale), so an absolute lambda means different
    # things for different losses. The paper uses absolute 1e-3.
    damping: float = Field(1e-3, ge=0.0)
    damping_mode: Literal["relative", "absolute"] = "relative"
    max_damping_tries: int = Field(4, ge=1)  # Cholesky retries, damping x10 each
    precondition_warmup: int = Field(0, ge=0)  # optimizer steps before preconditioning starts
    # Gradients are averaged over data-parallel ranks (DDP/accelerate): rescale
    # the all-reduced Sigma_g by 1/world^2 so it matches the global-batch loss.
    ddp_grads_averaged: bool = True
    # "tokens" multiplies Sigma_g by N^2 (N = tokens in the step) to undo a
    # mean-reduced loss's 1/N on v, giving a per-token Fisher (use with inner="sgd").
    g_factor_scale: Literal["none", "tokens"] = "none"

    # --- the guard: GRIT never trains as plain AdamW without saying so ---
    # After `guard_steps` optimizer steps, and every `guard_every` steps after that (checked at factor updates,
    # one host sync each), at least this share of the (layer, side) factors must be valid, else the run stops
    # with an error naming the layers. Step 1's Sigma_g is zero while B is still at its zero init, so the check
    # starts at step 2. 0 turns the guard off.
    min_valid_share: float = Field(0.9, ge=0.0, le=1.0)
    guard_steps: int = Field(2, ge=1)
    guard_every: int = Field(50, ge=1)

    # --- Fisher-guided reprojection / rank adaptation ---
    reproject_steps: int = Field(50, ge=0)  # 0 disables reprojection
    reproject_warmup: int = Field(100, ge=0)
    reproject_rank: int | None = Field(None, ge=1)  # fixed k; None -> r (or adaptive)
    rank_adaptation: bool = True
    energy_threshold: float = Field(0.99, gt=0.0, le=1.0)
    min_rank: int = Field(4, ge=1)
    reproject_sides: Literal["two", "one"] = "two"

    # --- optional regularisers (authors' code; off by default) ---
    curvature_reg: float = Field(0.0, ge=0.0)  # paper: 1e-5
    subspace_reg: float = Field(0.0, ge=0.0)  # paper: 1e-4
