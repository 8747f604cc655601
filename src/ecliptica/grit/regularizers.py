"""Optional GRIT penalties, in the form of the authors' code (both off by default).

curvature: sum_l tr(A^T Sigma_a A) + tr(B Sigma_g B^T)   -- weight ``curvature_reg``
subspace:  sum_l ||(I - P_a) A||^2 + ||B (I - P_g)||^2   -- weight ``subspace_reg``

Factors and projectors are constants (no gradient flows into them). P_a, P_g are
the projectors of the last reprojection (identity before one, so the subspace
penalty starts at 0).
"""

from __future__ import annotations

import torch

from .config import GritConfig
from .factors import FactorBank
from .layers import LoraLayerRef


def regularization_loss(
    layers: list[LoraLayerRef], slots: list[tuple[FactorBank, int]], cfg: GritConfig
) -> torch.Tensor:
    device = layers[0].lora_A.weight.device if layers else torch.device("cpu")
    total = torch.zeros((), device=device)
    if cfg.curvature_reg == 0.0 and cfg.subspace_reg == 0.0:
        return total
    for layer, (bank, j) in zip(layers, slots):
        a = layer.lora_A.weight.float()
        b = layer.lora_B.weight.float()
        term = torch.zeros((), device=a.device)
        if cfg.curvature_reg:
            on = bank.initialized[j].to(a.dtype)  # 0 until the layer has factors
            curv = ((bank.a_ema[j] @ a) * a).sum() + ((b @ bank.g_ema[j]) * b).sum()
            term = term + cfg.curvature_reg * on * curv
        if cfg.subspace_reg:
            off_a = a - bank.proj_a[j] @ a
            off_b = b - b @ bank.proj_g[j]
            term = term + cfg.subspace_reg * (off_a.square().sum() + off_b.square().sum())
        total = total + term.to(device)
    return total
