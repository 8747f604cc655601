"""Tiny models for GRIT tests: a peft-shaped LoRA linear layer without peft."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


class MiniLoraLinear(nn.Module):
    """Mimics peft's LoraLayer: y = W x + s * lora_B(lora_A(x)), adapter "default"."""

    def __init__(self, d_in: int, d_out: int, r: int = 4, scaling: float = 2.0):
        super().__init__()
        self.base_layer = nn.Linear(d_in, d_out)
        self.base_layer.requires_grad_(False)
        self.lora_A = nn.ModuleDict({"default": nn.Linear(d_in, r, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(r, d_out, bias=False)})
        nn.init.normal_(self.lora_B["default"].weight, std=0.3)  # non-zero B: Sigma_g != 0
        self.scaling = {"default": scaling}

    def forward(self, x):
        return self.base_layer(x) + self.lora_B["default"](self.lora_A["default"](x)) * self.scaling["default"]


class MiniNet(nn.Module):
    def __init__(self, d: int = 6, r: int = 4, checkpoint: str = "none"):
        super().__init__()
        self.l1 = MiniLoraLinear(d, 8, r)
        self.l2 = MiniLoraLinear(8, 5, r)
        self.head = nn.Linear(5, 3)  # non-LoRA trainable parameter
        self.checkpoint = checkpoint

    def _body(self, x):
        return self.l2(torch.tanh(self.l1(x)))

    def forward(self, x):
        if self.checkpoint == "none":
            h = self._body(x)
        else:
            h = torch.utils.checkpoint.checkpoint(self._body, x, use_reentrant=self.checkpoint == "reentrant")
        return self.head(h)


def make_net(seed: int = 0, **kw) -> MiniNet:
    torch.manual_seed(seed)
    return MiniNet(**kw)


def batch(seed: int = 1, b: int = 4, t: int = 5, d: int = 6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, d, generator=g)
    w = torch.randn(b, t, 3, generator=g)
    return x, w


def masked_loss(out, w, mask=None):
    """Mean over counted tokens of <out, w>; padding contributes no gradient."""
    per_tok = (out * w).sum(-1)
    if mask is None:
        return per_tok.mean()
    m = mask.float()
    return (per_tok * m).sum() / m.sum()


def factors(opt):
    """(Sigma_a, Sigma_g) stacked over layers, from the optimizer's banks."""
    sig_a = torch.cat([b.a_ema for b in opt.banks])
    sig_g = torch.cat([b.g_ema for b in opt.banks])
    return sig_a, sig_g


def ddp_factor_worker(rank, world, port, out_path):
    """One gloo rank: its half of ``batch(b=4)``, one GRIT step; rank 0 saves the factors."""
    from ecliptica.grit import GritConfig, GritOptimizer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x, w = batch(b=4)
        shard = slice(2 * rank, 2 * rank + 2)
        net = make_net()
        opt = GritOptimizer(net, GritConfig(reproject_steps=0, lr=1e-3))
        masked_loss(net(x[shard]), w[shard]).backward()
        opt.step()
        if rank == 0:
            torch.save(factors(opt), out_path)
    finally:
        dist.destroy_process_group()
