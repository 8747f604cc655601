"""FlexAttention and varlen attention over packed rows (train/attention.py) against the dense-mask reference.

FlexAttention has no backward on CPU, so these run forward only (no grad); varlen FlashAttention has no CPU
kernel at all, so its CPU test swaps in an exact per-sequence reference and checks everything around the
kernel (boundaries, layouts, the plumbing through transformers, that no dense mask is built). Losses and
gradients of both kernels are compared on the GPU by benchmarks/verify_kernels.py."""

import pytest
import torch
import torch.nn.functional as F
from train_helpers import tiny_peft, toy_pairs

from ecliptica.losses.layout import PAIRED
from ecliptica.train import attention
from ecliptica.train.batching import collate
from ecliptica.train.policy import PolicyModel


def test_document_mask_is_causal_within_each_sequence_only():
    lengths = [5, 9, 3, 7]  # one packed row; every sequence restarts its positions at 0
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    n = pos.shape[1]
    assert attention.sequence_ids(pos)[0].tolist() == [k for k, m in enumerate(lengths) for _ in range(m)]
    hand = torch.zeros(n, n, dtype=torch.bool)  # block-diagonal lower triangles, built by hand
    start = 0
    for m in lengths:
        hand[start : start + m, start : start + m] = torch.ones(m, m, dtype=torch.bool).tril()
        start += m
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, n, 8, generator=g) for _ in range(3))
    with torch.no_grad():
        flex = attention._flex(q, k, v, block_mask=attention.document_block_mask(pos))
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=hand)
        causal_only = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(flex, ref, rtol=1e-5, atol=1e-6)
    assert (flex - causal_only).abs().max() > 1e-2  # negative control: the sequences really are kept apart


@pytest.mark.parametrize("packed", [True, False])
def test_flex_policy_matches_dense_policy(tiny_model_dir, packed):
    """Log-probs, reference log-probs and the token KL of a packed (or padded) batch: flex == dense SDPA."""
    pairs = toy_pairs(4)
    batch = collate(pairs, PAIRED, pad_id=2, packed=packed)
    out = {}
    calls = []
    real = attention._flex
    attention._flex = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        for mode in ("dense", "flex"):
            policy = PolicyModel(tiny_peft(tiny_model_dir), chunk_size=8, packed_attention=mode)
            with torch.no_grad():
                out[mode] = policy(batch, need_reference=True, need_token_kl=True)
    finally:
        attention._flex = real
    # packed: 2 layers x (policy + reference) through flex; padded batches stay on SDPA
    assert len(calls) == (4 if packed else 0)
    for field in ("logps", "ref_logps", "token_kl_sum"):
        torch.testing.assert_close(getattr(out["flex"], field), getattr(out["dense"], field), rtol=1e-5, atol=1e-5)
    assert (out["dense"].logps - out["dense"].ref_logps).abs().max() > 1e-3  # the adapter is not a no-op


def _per_sequence_causal(q, k, v, bounds, max_len, scale):
    """Independent reference for varlen_attn: loop over the sequences, plain causal SDPA on each."""
    assert max_len >= int((bounds[1:] - bounds[:-1]).max())
    k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    out = torch.empty_like(q)
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))  # [H, n, D]
        out[a:b] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale).transpose(0, 1)
    return out


def test_sequence_bounds():
    pos = torch.cat([torch.arange(n) for n in (5, 9, 3)])[None]
    assert attention.sequence_bounds(pos).tolist() == [0, 5, 14, 17]
    assert attention.sequence_bounds(pos).dtype == torch.int32
    with pytest.raises(ValueError, match="one row"):
        attention.sequence_bounds(pos.expand(2, -1))


def test_collate_gives_the_packed_row_its_sequence_bounds():
    # computed on the host from the sequence lengths; the same offsets the position ids imply
    pairs = toy_pairs(3)
    batch = collate(pairs, PAIRED, pad_id=2, packed=True)
    assert batch.bounds.dtype == torch.int32
    assert batch.bounds.tolist() == attention.sequence_bounds(batch.position_ids).tolist()
    lengths = [len(p.prompt_ids) + len(p.chosen_ids) for p in pairs] + [
        len(p.prompt_ids) + len(p.rejected_ids) for p in pairs
    ]
    assert batch.bounds.tolist() == [sum(lengths[:i]) for i in range(len(lengths) + 1)]
    assert collate(pairs, PAIRED, pad_id=2, packed=False).bounds is None


@pytest.mark.parametrize("packed", [True, False])
def test_varlen_policy_matches_dense_policy(tiny_model_dir, packed, monkeypatch):
    """Packed rows through the varlen path (kernel swapped for a per-sequence loop): the same log-probs,
    reference log-probs and token KL as the dense block mask; transformers builds no dense mask for them."""
    pairs = toy_pairs(4)
    batch = collate(pairs, PAIRED, pad_id=2, packed=packed)
    calls, masks = [], []
    monkeypatch.setattr(attention, "_varlen_kernel", lambda *a: calls.append(a[3]) or _per_sequence_causal(*a))
    real_mask = attention._varlen_mask
    monkeypatch.setattr(attention, "_varlen_mask", lambda *a, **k: masks.append(real_mask(*a, **k)) or masks[-1])
    out = {}
    for mode in ("dense", "varlen"):
        policy = PolicyModel(tiny_peft(tiny_model_dir), chunk_size=8, packed_attention=mode)
        with torch.no_grad():
            out[mode] = policy(batch, need_reference=True, need_token_kl=True)
    if packed:  # 2 layers x (policy + reference), each given the 8 sequences' boundaries
        lengths = [len(p.prompt_ids) + len(p.chosen_ids) for p in pairs] + [
            len(p.prompt_ids) + len(p.rejected_ids) for p in pairs
        ]
        assert len(calls) == 4
        assert calls[0].tolist() == [0] + torch.tensor(lengths).cumsum(0).tolist()
        assert masks and all(m is None for m in masks)
    else:  # padded rows stay on SDPA with transformers' padding mask
        assert not calls and masks and all(m is not None for m in masks)
    for field in ("logps", "ref_logps", "token_kl_sum"):
        torch.testing.assert_close(getattr(out["varlen"], field), getattr(out["dense"], field), rtol=1e-5, atol=1e-5)
    assert (out["dense"].logps - out["dense"].ref_logps).abs().max() > 1e-3  # the adapter is not a no-op


def test_varlen_without_sequence_bounds_is_the_dense_path(tiny_model_dir):
    """A packed forward that does not pass its boundaries (outside PolicyModel) still gets transformers'
    block-diagonal mask, never plain causal attention across sequences."""
    batch = collate(toy_pairs(3), PAIRED, pad_id=2, packed=True)
    out = {}
    for mode in ("dense", "varlen"):
        lm = PolicyModel(tiny_peft(tiny_model_dir), packed_attention=mode).peft_model.get_base_model()
        with torch.no_grad():
            out[mode] = lm.get_decoder()(
                input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False
            ).last_hidden_state
    torch.testing.assert_close(out["varlen"], out["dense"], rtol=1e-5, atol=1e-5)


def test_resolve_packed_attention():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert attention.resolve_packed_attention("auto", cpu, "sdpa") == "dense"
    assert attention.resolve_packed_attention("auto", cuda, "sdpa", has_varlen=True) == "varlen"
    assert attention.resolve_packed_attention("auto", cuda, "sdpa", has_varlen=False) == "flex"
    assert attention.resolve_packed_attention("auto", cuda, "flash_attention_2") == "dense"  # its own varlen
    assert attention.resolve_packed_attention("dense", cuda, "sdpa") == "dense"
    assert attention.resolve_packed_attention("flex", cuda, "sdpa") == "flex"
    with pytest.raises(ValueError, match="packed_attention=flex"):
        attention.resolve_packed_attention("flex", cpu, "sdpa")
    with pytest.raises(ValueError, match="packed_attention=varlen"):
        attention.resolve_packed_attention("varlen", cpu, "sdpa")
    with pytest.raises(ValueError, match="no varlen|has none"):
        attention.resolve_packed_attention("varlen", cuda, "sdpa", has_varlen=False)


@pytest.mark.parametrize("api", ["window_size", "is_causal"])
def test_varlen_kernel_speaks_both_torch_apis(monkeypatch, api):
    """torch 2.9-2.10's varlen_attn takes is_causal and no scale or GQA; later releases take window_size, scale
    and enable_gqa. Either way the call must mean causal attention per sequence with the caller's scale and
    grouped key/value heads: checked against the per-sequence reference through a fake of each API."""
    import torch.nn.attention.varlen as varlen

    seen = {}

    def new_api(
        q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1), enable_gqa=False
    ):
        seen.update(window_size=window_size, enable_gqa=enable_gqa, scale=scale)
        assert window_size == (-1, 0) and (enable_gqa or k.shape[1] == q.shape[1])
        return _per_sequence_causal(q, k, v, cu_q, max_q, scale)

    def old_api(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None):
        seen.update(is_causal=is_causal)
        assert is_causal and k.shape[1] == q.shape[1]  # no GQA here: the caller repeats the kv heads
        return _per_sequence_causal(q, k, v, cu_q, max_q, None)

    monkeypatch.setattr(varlen, "varlen_attn", new_api if api == "window_size" else old_api)
    monkeypatch.setattr(attention, "_varlen_api", None)  # read the (fake) signature afresh
    g = torch.Generator().manual_seed(1)
    bounds = torch.tensor([0, 5, 14, 17], dtype=torch.int32)
    q = torch.randn(17, 4, 8, generator=g)
    k, v = (torch.randn(17, 2, 8, generator=g) for _ in range(2))  # 2 kv heads for 4 query heads
    for scale in (None, 0.2):
        out = attention._varlen_kernel(q, k, v, bounds, 17, scale)
        torch.testing.assert_close(out, _per_sequence_causal(q, k, v, bounds, 17, scale), rtol=1e-5, atol=1e-6)
    assert seen.get("window_size") == (-1, 0) or seen.get("is_causal") is True


def test_varlen_runs_fp32_activations_in_the_autocast_dtype(monkeypatch):
    """A 4-bit base keeps fp32 norms, so q/k/v arrive in fp32; FlashAttention has only 16-bit kernels. Under
    autocast they go in as the autocast dtype (as SDPA's inputs would) and the output comes back in fp32."""
    got = []
    monkeypatch.setattr(
        attention,
        "_varlen_kernel",
        lambda q, k, v, b, m, s: (
            got.append(q.dtype) or _per_sequence_causal(q.float(), k.float(), v.float(), b, m, s).to(q.dtype)
        ),
    )
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 9, 8, generator=g) for _ in range(3))
    bounds = torch.tensor([0, 4, 9], dtype=torch.int32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = attention.varlen_attention_forward(None, q, k, v, None, packed_bounds=bounds)
    assert got == [torch.bfloat16] and out.dtype == torch.float32 and out.shape == (1, 9, 2, 8)
    ref = _per_sequence_causal(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), bounds, 9, None)
    torch.testing.assert_close(out[0], ref, rtol=2e-2, atol=2e-2)  # bf16 inputs
    assert (out[0] - ref).abs().max() > 0  # control: the kernel really saw bf16, not the fp32 inputs
