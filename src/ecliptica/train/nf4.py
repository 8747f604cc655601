"""NF4 linear layers written in torch ops, so that the compiled decoder layer fuses their dequantisation.

bitsandbytes' 4-bit Linear reaches its CUDA code through Python: each call goes through an autograd Function, a
torch.library op whose kernel is registered in Python, and ctypes calls that dequantise the double-quantised
absmax and then the weight. On the H200 at the Llama-3-8B shape that is about 160 µs of host time per call, for 224
calls per pass and three passes per micro-batch with checkpointing, which leaves the 4-bit step host-bound at about
0.5 s per micro-batch (docs/archive/benchmarks_history.md, "a fused LoRA projection, the 4-bit budget"). Written
in torch ops inside the compiled layer, the dequantisation is one generated kernel per weight, issued by inductor's
wrapper with the rest of the layer.

Same arithmetic as bitsandbytes' kernels (kDequantizeBlockwise): the absmax of each 64-value block is
`code8[q] * absmax2[its block of 256] + offset` in fp32; each weight is `NF4[nibble] * absmax` in fp32, rounded once
to the compute dtype; a byte holds two weights, the high nibble first. tests/train/test_nf4.py checks this against
bitsandbytes' own dequantize_4bit; benchmarks/verify_kernels.py --4bit (paths nf4bnb and nf4torch) compares every
weight, and the losses and gradients, on the GPU.

Memory: bitsandbytes keeps only the packed weight for the backward and dequantises again there. Here the
dequantisation runs inside a checkpointed region (`torch.utils.checkpoint`), which the compiler's partitioner must
recompute in the backward rather than save, so no 16-bit copy of a weight outlives its matmul. Without the
compiled layers the bitsandbytes path stays (an eager autograd graph would keep the 16-bit weight for the backward).
"""

from __future__ import annotations

import types

import torch
from torch.utils.checkpoint import checkpoint

BUFFERS = ("nf4_packed", "nf4_absmax_q", "nf4_absmax_code", "nf4_absmax_scale", "nf4_absmax_offset", "nf4_code")


def resolve_nf4_kernel(setting: str, compiled_layers: bool) -> str:
    """`train.nf4_kernel`: auto = torch ops where the decoder layers are compiled, bitsandbytes elsewhere."""
    if setting == "auto":
        return "torch" if compiled_layers else "bitsandbytes"
    if setting == "torch" and not compiled_layers:
        raise ValueError(
            "train.nf4_kernel: torch needs compiled decoder layers (train.compile_layers on, or auto "
            "on a GPU): without the compile the 16-bit weights would be kept for the backward"
        )
    return setting


def dequantize_nf4(
    packed: torch.Tensor,
    absmax_q: torch.Tensor,
    absmax_code: torch.Tensor,
    absmax_scale: torch.Tensor,
    absmax_offset: torch.Tensor,
    code: torch.Tensor,
    out_features: int,
    in_features: int,
    blocksize: int,
    blocksize2: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The `[out_features, in_features]` weight in `dtype` from bitsandbytes' packed NF4 with a double-quantised
    absmax (8-bit codes into `absmax_code`, one fp32 scale per `blocksize2` codes, plus `absmax_offset`)."""
    n = out_features * in_features
    q = absmax_q.reshape(-1).long()
    scale = absmax_scale.repeat_interleave(blocksize2)[: q.numel()]
    absmax = absmax_code[q] * scale + absmax_offset
    byte = packed.reshape(-1)
    nibbles = torch.stack(((byte >> 4) & 0xF, byte & 0xF), dim=-1).reshape(-1)[:n].long()
    values = code[nibbles].view(-1, blocksize) * absmax.view(-1, 1)
    return values.to(dtype).view(out_features, in_features)


def dequantize_args(layer) -> tuple:
    """dequantize_nf4's arguments for bitsandbytes Linear4bit `layer`, read from its quantisation state (the first
    six are tensors, in BUFFERS order)."""
    state = layer.weight.quant_state
    device = state.absmax.device
    return (
        layer.weight.data,
        state.absmax,
        state.state2.code,
        state.state2.absmax,
        torch.as_tensor(state.offset, dtype=torch.float32, device=device),
        state.code.to(device=device, dtype=torch.float32),
        layer.out_features,
        layer.in_features,
        int(state.blocksize),
        int(state.state2.blocksize),
        layer.compute_dtype,
    )


def nf4_forward(self, x: torch.Tensor) -> torch.Tensor:
    """bitsandbytes Linear4bit's forward (cast to the compute dtype, matmul, cast back) with the torch dequant."""
    inp_dtype = x.dtype
    x = x.to(self.compute_dtype)
    # checkpointed: the partitioner recomputes the 16-bit weight in the backward instead of keeping it
    weight = checkpoint(
        dequantize_nf4,
        self.nf4_packed,
        self.nf4_absmax_q,
        self.nf4_absmax_code,
        self.nf4_absmax_scale,
        self.nf4_absmax_offset,
        self.nf4_code,
        self.out_features,
        self.in_features,
        self.nf4_blocksize,
        self.nf4_blocksize2,
        self.compute_dtype,
        use_reentrant=False,
    )
    bias = None if self.bias is None else self.bias.to(self.compute_dtype)
    return torch.nn.functional.linear(x, weight, bias).to(inp_dtype)


def unsupported_reason(layer) -> str | None:
    """Why bitsandbytes Linear4bit `layer` cannot take the torch path, or None when it can."""
    state = getattr(layer.weight, "quant_state", None)
    if state is None:
        return "no quantisation state (not quantised yet)"
    if state.quant_type != "nf4":
        return f"quant_type {state.quant_type} (the torch path is NF4 only)"
    if not state.nested or state.state2 is None:
        return "a single-quantised absmax (the torch path takes bitsandbytes' double quantisation)"
    if len(state.shape) != 2 or state.shape[0] * state.shape[1] % state.blocksize:
        return f"shape {tuple(state.shape)} not a whole number of {state.blocksize}-value blocks"
    if layer.weight.dtype != torch.uint8:
        return f"quant_storage {layer.weight.dtype} (the torch path reads uint8)"
    if layer.compute_dtype is None:
        return "no compute dtype"
    return None


def use_torch_nf4(model, required: bool = False) -> int:
    """Give every bitsandbytes 4-bit Linear of `model` the torch-ops forward; returns how many. A layer the path
    cannot take keeps bitsandbytes' forward, or raises when `required` (train.nf4_kernel: torch). The quantisation
    state's tensors become non-persistent buffers of the layer (the same storage, not copies), so the compiled
    graph takes them as inputs and one graph serves every layer; checkpoints are unchanged."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return 0
    count = 0
    for name, module in model.named_modules():
        if not isinstance(module, Linear4bit):
            continue
        reason = unsupported_reason(module)
        if reason is not None:
            if not required:
                continue
            raise ValueError(
                f"train.nf4_kernel: torch, but layer {name} has {reason}; set train.nf4_kernel: bitsandbytes (or auto)"
            )
        args = dequantize_args(module)
        for buffer, tensor in zip(BUFFERS, args):
            module.register_buffer(buffer, tensor, persistent=False)
        module.nf4_blocksize, module.nf4_blocksize2 = args[8], args[9]
        module.forward = types.MethodType(nf4_forward, module)
        count += 1
    return count


def keep_out_of_ddp(wrapper: torch.nn.Module) -> list[str]:
    """Tell DistributedDataParallel (before it wraps `wrapper`) to leave the NF4 buffers alone. DDP broadcasts every
    buffer from rank 0 at each forward by default; these are each process's own copy of the frozen 4-bit weights
    (several GiB at 8B), identical on every rank. Returns the names."""
    names = [n for n, _ in wrapper.named_buffers() if n.rsplit(".", 1)[-1] in BUFFERS]
    if names:
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(wrapper, names)
    return names
