"""train/nf4.py: the NF4 dequantisation in torch ops gives bitsandbytes' weights, and inside a compiled layer it
keeps no 16-bit weight for the backward.

References: a hand computation of the format (the QLoRA NF4 table, high nibble first, double-quantised absmax), and
bitsandbytes' own quantize_4bit / dequantize_4bit and Linear4bit on the CPU.
"""

from __future__ import annotations

import bitsandbytes as bnb  # a test dependency (pyproject [test]): its CPU ops are the reference
import bitsandbytes.functional as F
import pytest
import torch

from ecliptica.config import TrainConfig
from ecliptica.train.nf4 import (
    BUFFERS,
    dequantize_args,
    dequantize_nf4,
    keep_out_of_ddp,
    nf4_forward,
    resolve_nf4_kernel,
    use_torch_nf4,
)

# The NF4 table as printed in the QLoRA paper's appendix (Dettmers et al. 2023), to 4 decimals.
NF4_PAPER = [
    -1.0,
    -0.6962,
    -0.5251,
    -0.3949,
    -0.2844,
    -0.1848,
    -0.0911,
    0.0,
    0.0796,
    0.1609,
    0.2461,
    0.3379,
    0.4407,
    0.5626,
    0.7230,
    1.0,
]


def quantized_linear(out_features: int, in_features: int, seed: int = 0):
    """A bitsandbytes NF4 Linear (double-quantised absmax, bf16 compute) quantised on the CPU."""
    torch.manual_seed(seed)
    layer = bnb.nn.Linear4bit(
        in_features, out_features, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True
    )
    w = (torch.randn(out_features, in_features) * 0.05).to(torch.bfloat16)
    layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True)
    layer.weight = layer.weight._quantize("cpu")
    return layer


def test_the_format_by_hand():
    """One 64-value block: byte k holds weights 2k (high nibble) and 2k+1 (low nibble); the absmax is
    code8[q] * scale + offset; each weight is NF4[nibble] * absmax, rounded once to bf16."""
    code = torch.tensor(NF4_PAPER, dtype=torch.float32)
    nibbles = [(3 * k + 5) % 16 for k in range(64)]
    packed = torch.tensor([(nibbles[2 * k] << 4) | nibbles[2 * k + 1] for k in range(32)], dtype=torch.uint8)
    absmax_code = torch.linspace(-1, 1, 256)
    q, scale, offset = 200, 0.75, 0.125
    absmax = float(absmax_code[q]) * scale + offset
    expected = torch.tensor([NF4_PAPER[n] * absmax for n in nibbles], dtype=torch.float64).to(torch.bfloat16)
    got = dequantize_nf4(
        packed.view(-1, 1),
        torch.tensor([q], dtype=torch.uint8),
        absmax_code,
        torch.tensor([scale]),
        torch.tensor(offset),
        code,
        2,
        32,
        64,
        256,
        torch.bfloat16,
    )
    assert got.shape == (2, 32)
    assert torch.equal(got.flatten(), expected)


def by_hand(layer) -> torch.Tensor:
    """The format computed from the quantisation state's raw fields in float64: absmax = code8[q] x absmax2 + offset
    (one absmax2 per 256 absmax values), weight = NF4[nibble] x absmax over the flattened weight, high nibble first,
    rounded once to bf16."""
    st = layer.weight.quant_state
    s2 = st.state2
    absmax2 = s2.absmax.double().repeat_interleave(s2.blocksize)[: st.absmax.numel()]
    absmax = s2.code.double()[st.absmax.long()] * absmax2 + st.offset.double()
    packed = layer.weight.data.view(torch.uint8).flatten().long()
    nibbles = torch.stack([packed >> 4, packed & 15], dim=1).flatten()
    w = st.code.double()[nibbles] * absmax.repeat_interleave(st.blocksize)[: nibbles.numel()]
    return w.to(torch.bfloat16).view(st.shape)


@pytest.mark.parametrize("shape", [(96, 128), (48, 80), (320, 192), (1024, 320), (40, 72)])
def test_dequantisation_equals_bitsandbytes(shape):
    """Every value equal to the format by hand and to bitsandbytes' portable dequantize_4bit, including a last
    absmax block shorter than 256 and rows that are not a whole number of 64-value blocks."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    layer = quantized_linear(*shape)
    st = layer.weight.quant_state
    assert st.nested and st.quant_type == "nf4" and st.blocksize == 64
    got = dequantize_nf4(*dequantize_args(layer))
    assert got.dtype == torch.bfloat16 and got.shape == shape
    assert torch.equal(got, by_hand(layer))
    # bitsandbytes' PyTorch implementation (its default backend; CUDA indexes blocks over the flattened weight too)
    absmax = F.dequantize_blockwise(st.absmax, st.state2) + st.offset
    portable = _dequantize_4bit_compute(
        layer.weight.data.view(torch.uint8).flatten(), absmax, st.code, 64, shape, torch.bfloat16
    )
    assert torch.equal(got, portable)
    # bitsandbytes' CPU dispatcher picks a C kernel on AVX-512 CPUs (torch >= 2.6); for (48, 80) it gave 3,138 of
    # 3,840 values from the wrong block's absmax here (bitsandbytes 0.50.2), so it is compared on whole-block rows only
    if shape[1] % 64 == 0:
        assert torch.equal(got, F.dequantize_4bit(layer.weight.data, st))
    # bitsandbytes' table is the paper's NF4 (the format is what it says)
    assert torch.allclose(st.code.float(), torch.tensor(NF4_PAPER), atol=5e-5)


def test_layer_forward_and_input_gradient_equal_bitsandbytes():
    layer = quantized_linear(192, 128, seed=1)
    x = torch.randn(2, 7, 128, dtype=torch.bfloat16, requires_grad=True)
    ref = layer(x)
    (g_ref,) = torch.autograd.grad(ref.float().square().sum(), x)
    use_torch_nf4(layer)
    assert layer.forward.__func__ is nf4_forward
    x2 = x.detach().clone().requires_grad_(True)
    got = layer(x2)
    (g_got,) = torch.autograd.grad(got.float().square().sum(), x2)
    assert got.dtype == ref.dtype
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    torch.testing.assert_close(g_got, g_ref, rtol=1.6e-2, atol=1e-5)  # bf16 rounding of the two backward orders
    # the state dict a checkpoint would write is unchanged: the buffers are not persistent
    assert not any(k.startswith("nf4_") for k in layer.state_dict())


class Block(torch.nn.Module):
    """Two NF4 projections with a LoRA-like bf16 side path, like a decoder MLP."""

    def __init__(self, seed: int):
        super().__init__()
        self.up, self.down = quantized_linear(512, 256, seed), quantized_linear(256, 512, seed + 1)
        self.a = torch.nn.Linear(256, 8, bias=False, dtype=torch.bfloat16)
        self.b = torch.nn.Linear(8, 512, bias=False, dtype=torch.bfloat16)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.up(x) + self.b(self.a(x))))


def run_saving(blk, x):
    """One forward and backward of `blk`; returns the input gradient and what autograd saved for the backward."""
    saved = []
    xi = x.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = blk(xi)
    y.float().square().sum().backward()
    return xi.grad, saved


def weights_16bit(saved):
    return [tuple(t.shape) for t in saved if t.dtype == torch.bfloat16 and t.dim() == 2 and t.numel() >= 256 * 512]


def test_compiled_layer_keeps_no_16bit_weight_for_the_backward():
    """What the compiled graph saves for the backward, seen by saved-tensor hooks: the packed weights and small
    tensors only, never a [out x in] 16-bit weight (bitsandbytes keeps only the packed weight as well). Eagerly the
    same torch ops would keep it, which is why `auto` takes them only in compiled layers. Two blocks share one graph,
    and the gradients equal the eager bitsandbytes path's within bf16 rounding."""
    from ecliptica.train import compile as C

    # a torch config entry is patched with its own context manager: pytest's monkeypatch undo hides the entry from
    # later tests (tests/train/test_compile.py)
    with torch._functorch.config.patch(activation_memory_budget=C.ACTIVATION_MEMORY_BUDGET):
        _check_compiled_blocks()


def _check_compiled_blocks():
    import torch._dynamo.utils as dynamo_utils

    torch._dynamo.reset()
    blocks = [Block(seed) for seed in (0, 2)]
    x = torch.randn(96, 256, dtype=torch.bfloat16)
    eager = []
    for blk in blocks:
        grad, saved = run_saving(blk, x)
        assert weights_16bit(saved) == []  # bitsandbytes' own path
        eager.append(grad)
    for blk in blocks:
        assert use_torch_nf4(blk) == 2
    _, saved = run_saving(blocks[0], x)
    assert sorted(weights_16bit(saved)) == [(256, 512), (512, 256)]  # eager torch ops: the control
    for blk in blocks:
        blk.compile(dynamic=True)
    dynamo_utils.counters.clear()
    for blk, g_ref in zip(blocks, eager):
        grad, saved = run_saving(blk, x)
        assert weights_16bit(saved) == []
        assert any(t.dtype == torch.uint8 and t.numel() == 256 * 512 // 2 for t in saved)  # the packed weight
        rel = float((grad.float() - g_ref.float()).norm() / g_ref.float().norm())
        assert rel < 1e-2  # elementwise, fused kernels and eager round bf16 differently
    assert dynamo_utils.counters["stats"]["unique_graphs"] == 1


def test_resolve_and_config():
    assert resolve_nf4_kernel("auto", compiled_layers=True) == "torch"
    assert resolve_nf4_kernel("auto", compiled_layers=False) == "bitsandbytes"
    assert resolve_nf4_kernel("bitsandbytes", compiled_layers=True) == "bitsandbytes"
    with pytest.raises(ValueError, match="train.nf4_kernel: torch needs compiled decoder layers"):
        resolve_nf4_kernel("torch", compiled_layers=False)
    assert TrainConfig.model_validate({"model": {"name": "x"}}).train.nf4_kernel == "auto"
    with pytest.raises(ValueError, match="nf4_kernel"):
        TrainConfig.model_validate({"model": {"name": "x"}, "train": {"nf4_kernel": "triton"}})


def test_a_layer_the_torch_path_cannot_take_keeps_bitsandbytes_or_is_named():
    layer = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="fp4")
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 128).to(torch.bfloat16), requires_grad=False, quant_type="fp4")
    layer.weight = layer.weight._quantize("cpu")
    model = torch.nn.Sequential(layer, quantized_linear(32, 64))
    with pytest.raises(ValueError, match=r"layer 0 has quant_type fp4 .*set train.nf4_kernel: bitsandbytes"):
        use_torch_nf4(model, required=True)
    assert use_torch_nf4(model) == 1  # auto: the NF4 layer takes the torch path, the FP4 one keeps bitsandbytes'
    assert model[1].forward.__func__ is nf4_forward and model[0].forward.__func__ is bnb.nn.Linear4bit.forward


def test_ddp_leaves_the_nf4_buffers_alone(tmp_path):
    """DDP broadcasts module buffers from rank 0 at every forward unless told not to; the NF4 buffers are each
    process's frozen weights. A one-process gloo group on the CPU shows DDP keeps them out of its buffer list."""
    import torch.distributed as dist

    wrapper = torch.nn.Sequential(Block(0))
    use_torch_nf4(wrapper)
    names = keep_out_of_ddp(wrapper)
    assert len(names) == 2 * len(BUFFERS) and all(
        n.startswith("0.up.nf4_") or n.startswith("0.down.nf4_") for n in names
    )
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/group", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(wrapper)
        kept = {id(b) for b in ddp.modules_buffers}
        assert not any(id(b) in kept for n, b in wrapper.named_buffers() if n in names)
        assert set(names) <= ddp.parameters_to_ignore
    finally:
        dist.destroy_process_group()


def test_an_nf4_kernel_asked_for_on_a_16bit_model_is_an_error(tmp_path, tiny_model_dir):
    """Asked for explicitly and unable to take effect: the run stops, naming the key, instead of ignoring it."""
    from train_helpers import cita_grit_config

    from ecliptica.train.engine import Trainer

    for kernel in ("torch", "bitsandbytes"):
        cfg = cita_grit_config(tmp_path / kernel, tiny_model_dir, limit=8, lr=1e-3, nf4_kernel=kernel)
        with pytest.raises(ValueError, match=f"train.nf4_kernel: {kernel} applies to a 4-bit model only"):
            Trainer(cfg).setup()
