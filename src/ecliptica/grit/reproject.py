"""Fisher-guided reprojection: top-k eigen-projectors of the rank-space factors."""

from __future__ import annotations

import torch

from .config import GritConfig


@torch.no_grad()
def sorted_eigh(sigma: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs in descending order; invalid factors are replaced by I (projector = I)."""
    eye = torch.eye(sigma.shape[-1], device=sigma.device, dtype=sigma.dtype)
    safe = torch.where(valid[:, None, None], sigma, eye)
    safe = 0.5 * (safe + safe.transpose(-1, -2))
    evals, evecs = torch.linalg.eigh(safe)
    return evals.flip(-1), evecs.flip(-1)


@torch.no_grad()
def choose_ranks(evals: torch.Tensor, cfg: GritConfig) -> torch.Tensor:
    """k per layer: fixed ``reproject_rank`` (<= r), or the smallest k reaching ``energy_threshold``, in [min_rank, r]."""
    n, r = evals.shape
    if cfg.rank_adaptation:
        energy = evals.clamp_min(0.0)
        total = energy.sum(-1, keepdim=True)
        frac = energy.cumsum(-1) / total.clamp_min(torch.finfo(energy.dtype).tiny)
        # Tolerance so that tau = 1 does not fail on float round-off of the last term.
        k = (frac < cfg.energy_threshold - 1e-6).sum(-1) + 1
        k = torch.where(total.squeeze(-1) > 0, k, torch.full_like(k, r))
        return k.clamp(min(cfg.min_rank, r), r)
    fixed = r if cfg.reproject_rank is None else min(cfg.reproject_rank, r)
    return torch.full((n,), fixed, dtype=torch.long, device=evals.device)


@torch.no_grad()
def projectors(evecs: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """P = U_k U_k^T, built with a column mask so every layer stays in one batched op."""
    r = evecs.shape[-1]
    keep = (torch.arange(r, device=evecs.device)[None, :] < k[:, None]).to(evecs.dtype)
    return (evecs * keep[:, None, :]) @ evecs.transpose(-1, -2)


@torch.no_grad()
def relative_change(
    gram_b: torch.Tensor, gram_a: torch.Tensor, proj_g: torch.Tensor, proj_a: torch.Tensor
) -> torch.Tensor:
    """||B'A' - BA||_F / ||BA||_F per layer from r x r Grams (G_B = B^T B, G_A = A A^T)."""
    eye = torch.eye(gram_a.shape[-1], device=gram_a.device, dtype=gram_a.dtype)
    m = proj_g @ proj_a - eye  # B'A' - BA = B M A
    num = torch.diagonal(m.transpose(-1, -2) @ gram_b @ m @ gram_a, dim1=-2, dim2=-1).sum(-1)
    den = torch.diagonal(gram_b @ gram_a, dim1=-2, dim2=-1).sum(-1)
    return (num.clamp_min(0) / den.clamp_min(1e-30)).sqrt()
