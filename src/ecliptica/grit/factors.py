"""Rank-space K-FAC factors: collection hooks, stacked storage, EMA, all-reduce.

For a LoRA layer y = W x + s * B (A x), let u = A x (N x r, the output of lora_A)
and v = dL/du (= s * g B). Sigma_a = u^T u / N and Sigma_g = v^T v / N are r x r.
Factors of all layers sharing (rank, device) live stacked in one ``FactorBank`` so
EMA, Cholesky and eigendecompositions are single batched calls.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from .layers import LoraLayerRef

_STATE_KEYS = (
    "a_sum",
    "g_sum",
    "count",
    "a_ema",
    "g_ema",
    "initialized",
    "chol_a",
    "chol_g",
    "valid_a",
    "valid_g",
    "damping_a",
    "damping_g",
    "escalations",
    "ranks",
    "proj_a",
    "proj_g",
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
        self.g_sum.copy_(flat[k : 2 * k].view_as(self.g_sum))
        self.count.copy_(flat[2 * k :])
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

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k).clone() for k in _STATE_KEYS}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k in _STATE_KEYS:
            getattr(self, k).copy_(state[k])


class FactorTap(torch.autograd.Function):
    """The identity on u = A x whose backward also yields, as the gradients of three per-layer sum tensors, the
    masked sums uᵀu, vᵀv (v = dL/du) and the token count.

    The sums travel as gradients, so autograd accumulates them over the micro-batches of a step like any
    gradient, and a compiled graph computes them inside its own backward: there is no Python side effect for
    torch.compile to drop or reorder (tensor hooks inside compiled layers crashed Inductor in torch 2.11:
    tests/grit/test_collection_paths.py). Under gradient checkpointing the backward runs once per micro-batch,
    as for any other node.
    """

    @staticmethod
    def forward(ctx, u, mask, sum_a, sum_g, count):
        ctx.save_for_backward(u, mask)
        return u.view_as(u)

    @staticmethod
    def backward(ctx, v):
        u, mask = ctx.saved_tensors
        r = u.shape[-1]
        u2, v2 = u.reshape(-1, r).float(), v.reshape(-1, r).float()
        if mask is None:
            n = torch.full((), u2.shape[0], dtype=torch.float32, device=u2.device)
        else:
            # multiply instead of boolean-indexing: no host sync, same sums
            m = mask.reshape(-1, 1).to(torch.float32)
            u2, v2, n = u2 * m, v2 * m, m.sum()
        return v, None, u2.T @ u2, v2.T @ v2, n


class FactorCollector:
    """Feeds u and v of every LoRA layer into its ``FactorBank`` through a ``FactorTap`` on ``lora_A``'s output.

    The tap is applied by a forward hook on ``lora_A`` that returns the tapped output, so every forward that
    calls ``lora_A`` (peft's LoRA Linear, the fused projection in train/fused_lora.py, eager or compiled) taps
    u. Each layer owns three leaf tensors (``grit_sums`` on its ``lora_A``) whose gradients are its pending
    sums; ``harvest`` stacks them into the banks before a factor update. They are plain tensors, not
    parameters or buffers, so no optimizer, DDP or FSDP wrapper touches them.
    """

    def __init__(self, layers: list[LoraLayerRef]):
        self.layers = layers
        self.banks: dict[tuple[int, torch.device], FactorBank] = {}
        self.slots: list[tuple[FactorBank, int]] = []
        groups: dict[tuple[int, torch.device], list[int]] = {}
        for i, layer in enumerate(layers):
            groups.setdefault((layer.rank, layer.lora_A.weight.device), []).append(i)
        slot_of = {}
        for (r, device), members in groups.items():
            bank = FactorBank(r, len(members), device)
            self.banks[(r, device)] = bank
            for j, i in enumerate(members):
                slot_of[i] = (bank, j)
        self.slots = [slot_of[i] for i in range(len(layers))]
        # each bank with its layers in slot order: harvest stacks the layers' sums in this order
        self._members = [
            (bank, [i for i, (b, _) in enumerate(self.slots) if b is bank]) for bank in self.banks.values()
        ]
        self.enabled = True
        self.token_mask: torch.Tensor | None = None
        self.sums: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._handles = []
        for layer in layers:
            r, device = layer.rank, layer.lora_A.weight.device
            sums = tuple(torch.zeros(shape, device=device, requires_grad=True) for shape in ((r, r), (r, r), ()))
            layer.lora_A.grit_sums = sums
            self.sums.append(sums)
            # one bound method for every layer: the compiled decoder layers share one graph, and a per-layer
            # hook object would be a per-layer guard
            self._handles.append(layer.lora_A.register_forward_hook(self._tap))

    def _tap(self, module, inputs, output):
        if not (self.enabled and torch.is_grad_enabled() and output.requires_grad):
            return None
        mask = self.token_mask
        if mask is not None and tuple(mask.shape) != tuple(output.shape[:-1]):
            mask = None  # a layer that does not see the batch's token layout counts every row
        sum_a, sum_g, count = module.grit_sums
        return FactorTap.apply(output, mask, sum_a, sum_g, count)

    @torch.no_grad()
    def harvest(self) -> None:
        """Move the pending sums (the leaves' gradients) into the banks and clear them."""
        for bank, members in self._members:
            for k, target in enumerate((bank.a_sum, bank.g_sum, bank.count)):
                grads = [self.sums[i][k].grad for i in members]
                if all(g is None for g in grads):
                    continue
                target.add_(
                    torch.stack(
                        [g if g is not None else torch.zeros_like(self.sums[i][k]) for g, i in zip(grads, members)]
                    )
                )
        self.clear()

    def clear(self) -> None:
        for sums in self.sums:
            for t in sums:
                t.grad = None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for layer in self.layers:
            layer.lora_A.__dict__.pop("grit_sums", None)
