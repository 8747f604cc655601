"""Fused LoRA projection: base(x) + s·(x Aᵀ) Bᵀ with the scale and the add done by the second GEMM.

peft's LoRA Linear computes `base(x) + lora_B(lora_A(dropout(x))) * scaling`: besides the three matmuls it casts x
to the adapter's dtype (16-bit bases; autocast casts it back), multiplies by the scale and adds, each a kernel
that reads and writes a `[tokens x out]` tensor, and a 4-bit base adds a defensive copy of its output. Here the
up-projection is `torch.addmm(base(x), x Aᵀ, Bᵀ, alpha=s)`: cuBLAS applies the scale and accumulates onto the base
output in the GEMM's epilogue, so two to three memory-bound kernels per projection go away (seven projections per
Llama layer, forward and backward).

Same arithmetic: `beta·C + alpha·(M1 @ M2)` with beta = 1 is the LoRA sum; it rounds once where peft rounds the
product, the scaled product and the sum. tests/train/test_fused_lora.py checks it against a float64 hand
computation on CPU; benchmarks/verify_kernels.py (path `fusedlora`) checks losses and gradients on the GPU.

Where peft's own forward is needed it is used: adapters disabled (the reference pass) or merged, extra forward
arguments (mixed-adapter batches), and a layer whose inputs are not in the adapter's dtype without autocast.
"""

from __future__ import annotations

import types

import torch


def resolve_fused_lora(setting: str, device: torch.device) -> bool:
    """`train.fused_lora`: auto = on CUDA only (measured: docs/archive/benchmarks_history.md, "a fused LoRA
    projection")."""
    if setting == "auto":
        return device.type == "cuda"
    return setting == "on"


def unsupported_reason(layer) -> str | None:
    """Why `layer` (a peft LoRA Linear) cannot take the fused path, or None when it can."""
    if len(layer.active_adapters) != 1:
        return f"{len(layer.active_adapters)} active adapters (the fused path takes one)"
    name = layer.active_adapters[0]
    if name in getattr(layer, "lora_variant", {}):
        return "a LoRA variant (DoRA or similar)"
    if layer.lora_B[name].bias is not None:
        return "a LoRA bias"
    return None


def fused_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A peft LoRA Linear's forward with the LoRA up-projection, scale and sum in one addmm (bound per layer)."""
    name = self.active_adapters[0]
    lora_A = self.lora_A[name].weight
    if (
        self.disable_adapters
        or self.merged
        or args
        or kwargs
        or (x.dtype != lora_A.dtype and not torch.is_autocast_enabled(x.device.type))
    ):
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    # through the lora_A module, not its weight: GRIT's factor tap is a forward hook on it (grit/factors.py)
    down = self.lora_A[name](self.lora_dropout[name](x))
    out = torch.addmm(
        result.reshape(-1, result.shape[-1]),
        down.reshape(-1, down.shape[-1]),
        self.lora_B[name].weight.t(),
        alpha=self.scaling[name],
    )
    return out.view(result.shape)


def fuse_lora_layers(peft_model, required: bool = False) -> int:
    """Give every LoRA Linear of `peft_model` the fused forward; returns how many. A layer the fused path cannot
    take keeps peft's forward, or raises when `required` (train.fused_lora: on)."""
    from peft.tuners.lora import LoraLayer

    fused = 0
    for module_name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        # torch Linear bases, bitsandbytes' 4-bit Linear among them (a Linear subclass); not embeddings or convs
        if not isinstance(module.get_base_layer(), torch.nn.Linear):
            continue
        reason = unsupported_reason(module)
        if reason is not None:
            if required:
                raise ValueError(
                    f"train.fused_lora: on, but LoRA layer {module_name} has {reason}; "
                    f"set train.fused_lora: off (or auto)"
                )
            continue
        module.forward = types.MethodType(fused_lora_forward, module)
        fused += 1
    return fused
