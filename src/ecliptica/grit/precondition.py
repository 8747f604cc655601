"""Damped Cholesky of stacked r x r factors and the rank-space gradient solves."""

from __future__ import annotations

import torch


@torch.no_grad()
def damped_cholesky(
    sigma: torch.Tensor, initialized: torch.Tensor, damping: float, mode: str, max_tries: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cholesky of Sigma + d I for a stack of factors [n, r, r], sync-free.

    d = damping (absolute) or damping * trace(Sigma) / r (relative). Where the
    factorisation fails, d is multiplied by 10 (up to ``max_tries`` attempts). All
    attempts run batched and unconditionally, which costs a few tiny kernels but
    avoids a host sync. Factors that are uninitialised, zero (e.g. Sigma_g while
    B == 0) or non-finite, or that never factor, get L = I: no preconditioning.

    Returns (L, valid, effective damping, escalations per layer).
    """
    n, r, _ = sigma.shape
    eye = torch.eye(r, device=sigma.device, dtype=sigma.dtype)
    mean_eig = torch.diagonal(sigma, dim1=-2, dim2=-1).sum(-1) / r
    valid = initialized & torch.isfinite(sigma).all((-1, -2)) & (mean_eig > 0)
    base = damping * mean_eig if mode == "relative" else torch.full_like(mean_eig, damping)
    base = torch.where(valid, base, torch.zeros_like(base))
    sig = torch.where(valid[:, None, None], sigma, eye)  # identity stand-in for invalid layers

    chol, info = torch.linalg.cholesky_ex(sig + base[:, None, None] * eye)
    ok = info == 0
    used = base
    escalations = torch.zeros_like(base)
    # Retries need a positive damping even when lambda == 0.
    retry = torch.maximum(base, 1e-6 * mean_eig.abs())
    for k in range(1, max_tries):
        d = retry * 10.0**k
        chol_k, info_k = torch.linalg.cholesky_ex(sig + d[:, None, None] * eye)
        escalations += (~ok).to(escalations.dtype)
        take = ~ok & (info_k == 0)
        chol = torch.where(take[:, None, None], chol_k, chol)
        used = torch.where(take, d, used)
        ok = ok | take
    chol = torch.where(ok[:, None, None], chol, eye)
    valid = valid & ok
    return chol, valid, torch.where(valid, used, torch.zeros_like(used)), escalations


@torch.no_grad()
def precondition_stack(
    grads: list[torch.Tensor], chol: torch.Tensor, side: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Solve (never invert) one shape-group of LoRA gradients.

    side "left":  G <- M^-1 G     (A grads, r x in)
    side "right": G <- G M^-1     (B grads, out x r), done as (M^-1 G^T)^T since M = M^T.
    Returns (preconditioned stack in fp32, raw sum of squares, preconditioned sum of squares).
    """
    g = torch.stack(grads).float()
    if side == "left":
        out = torch.cholesky_solve(g, chol)
    else:
        out = torch.cholesky_solve(g.transpose(1, 2), chol).transpose(1, 2)
    return out, g.square().sum(), out.square().sum()
