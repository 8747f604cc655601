"""Rank-space K-FAC factors: collection hooks, stacked storage, EMA, all-reduce.

For a LoRA layer y = W x + s * B (A x), let u = A x (N x r, the output of lora_A)
and v = dL/du (= s * g B). Sigma_a = u^T u / N and Sigma_g = v^T v / N are r x r.
Factors of all layers sharing (rank, device) live stacked in one ``FactorBank`` so
EMA, Cholesky and eigendecompositions are single batched calls.
"""

from __future__ import annotations

import functools
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from .layers import LoraLayerRef

_STATE_KEYS = (
    "a_sum", "g_sum", "count", "a_ema", "g_ema", "initialized",
    "chol_a", "chol_g", "valid_a", "valid_g", "damping_a", "damping_g",
    "escalations", "ranks", "proj_a", "proj_g",
)


class FactorBank:
    """Stacked factor state of ``n`` LoRA layers with rank ``r`` on one device."""

    def __init__(self, r: int, n: int, device: torch.device):
        self.r, self.n, self.device = r, n, device
        zeros = functools.partial(torch.zeros, device=device)
        eye = torch.eye(r, device=device).expand(n, r, r)
        # Pending sums over the micro-batches of the current optimizer step.
        self.a_sum, self.g_sum, self.count = zeros(n, r, r), zeros(n, r, r), zeros(n)
        self.a_ema, self.g_ema = zeros(n, r, r), zeros(n, r, r)
        self.initialized = zeros(n, dtype=torch.bool)
        # Cholesky factors of the damped factors; identity where a side is invalid,
        # which makes preconditioning that side an exact no-op.
        self.chol_a, self.chol_g = eye.clone(), eye.clone()
        self.valid_a, self.valid_g = zeros(n, dtype=torch.bool), zeros(n, dtype=torch.bool)
        self.damping_a, self.damping_g = zeros(n), zeros(n)
        self.escalations = zeros(n)
        # Reprojection results: effective rank k and the projectors used.
        self.ranks = torch.full((n,), r, dtype=torch.long, device=device)
        self.proj_a, self.proj_g = eye.clone(), eye.clone()

    # -- collection (called from autograd hooks) --------------------------------
    @torch.no_grad()
    def accumulate(self, idx: int, u: torch.Tensor, v: torch.Tensor,
                   mask: Optional[torch.Tensor]) -> None:
        u2 = u.reshape(-1, self.r).float()
        v2 = v.reshape(-1, self.r).float()
        if mask is not None and mask.numel() == u2.shape[0] and tuple(mask.shape) == tuple(u.shape[:-1]):
            # Multiply instead of boolean-indexing: no host sync, same sums.
            m = mask.reshape(-1, 1).to(device=u2.device, dtype=torch.float32)
            u2, v2 = u2 * m, v2 * m
            self.count[idx] += m.sum()
        else:
            self.count[idx] += u2.shape[0]
        self.a_sum[idx].addmm_(u2.T, u2)
        self.g_sum[idx].addmm_(v2.T, v2)

    def reset_sums(self) -> None:
        self.a_sum.zero_()
        self.g_sum.zero_()
        self.count.zero_()

    def all_reduce_sums(self, grads_averaged: bool = True) -> None:
        """SUM sums and counts over ranks so factors equal those of the global batch.

        DDP/accelerate average gradients over ranks, i.e. the global loss is the
        local one divided by the world size W; the local v = dL_local/du is therefore
        W times the global one, and Sigma_g is rescaled by 1/W^2 (``grads_averaged``).
        """
        if not (dist.is_available() and dist.is_initialized()):
            return
        world = dist.get_world_size()
        if world == 1:
            return
        flat = torch.cat([self.a_sum.flatten(), self.g_sum.flatten(), self.count])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        k = self.a_sum.numel()
        self.a_sum.copy_(flat[:k].view_as(self.a_sum))
        self.g_sum.copy_(flat[k:2 * k].view_as(self.g_sum))
        self.count.copy_(flat[2 * k:])
        if grads_averaged:
            self.g_sum.div_(world * world)

    @torch.no_grad()
    def update_ema(self, decay: float, per_token_g: bool = False) -> None:
        """Sigma = sum / N, then EMA; layers without tokens or with non-finite sums keep the old value."""
        n = self.count.clamp_min(1.0)[:, None, None]
        new_a, new_g = self.a_sum / n, self.g_sum / n
        if per_token_g:
            new_g = new_g * n * n
        ok = (self.count > 0) & torch.isfinite(new_a).all((-1, -2)) & torch.isfinite(new_g).all((-1, -2))
        first = ~self.initialized  # first observation replaces the zero init (no EMA bias)
        for ema, new in ((self.a_ema, new_a), (self.g_ema, new_g)):
            blended = torch.where(first[:, None, None], new, decay * ema + (1.0 - decay) * new)
            ema.copy_(torch.where(ok[:, None, None], blended, ema))
        self.initialized |= ok

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {k: getattr(self, k).clone() for k in _STATE_KEYS}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        for k in _STATE_KEYS:
            getattr(self, k).copy_(state[k])


class FactorCollector:
    """Hooks that feed u and v of every LoRA layer into its ``FactorBank``.

    A forward hook on ``lora_A`` registers a tensor hook on its output u; the tensor
    hook sees u and dL/du together and fires once per backward pass, also under
    gradient checkpointing (reentrant: only the recomputed forward has grad; non-
    reentrant: the original u gets the gradient, the recomputed one never does).
    """

    def __init__(self, layers: List[LoraLayerRef]):
        self.layers = layers
        self.banks: Dict[Tuple[int, torch.device], FactorBank] = {}
        self.slots: List[Tuple[FactorBank, int]] = []
        groups: Dict[Tuple[int, torch.device], List[int]] = {}
        for i, layer in enumerate(layers):
            groups.setdefault((layer.rank, layer.lora_A.weight.device), []).append(i)
        slot_of = {}
        for (r, device), members in groups.items():
            bank = FactorBank(r, len(members), device)
            self.banks[(r, device)] = bank
            for j, i in enumerate(members):
                slot_of[i] = (bank, j)
        self.slots = [slot_of[i] for i in range(len(layers))]
        self.enabled = True
        self.token_mask: Optional[torch.Tensor] = None
        self._handles = [
            layer.lora_A.register_forward_hook(functools.partial(self._on_forward, i))
            for i, layer in enumerate(layers)
        ]

    def _on_forward(self, i: int, module, inputs, output) -> None:
        if not (self.enabled and torch.is_grad_enabled() and output.requires_grad):
            return
        bank, j = self.slots[i]
        # Keep a detached alias (no autograd cycle) and the mask current at forward time.
        u, mask = output.detach(), self.token_mask

        def on_grad(grad: torch.Tensor) -> None:
            bank.accumulate(j, u, grad, mask)

        output.register_hook(on_grad)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
