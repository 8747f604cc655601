"""FlexAttention over packed rows (train/attention.py) against the dense-mask reference.

FlexAttention has no backward on CPU, so these run forward only (no grad); the gradients are compared on the
GPU by benchmarks/verify_kernels.py."""
import pytest
import torch
import torch.nn.functional as F
from train_helpers import tiny_peft, toy_pairs

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
        hand[start:start + m, start:start + m] = torch.ones(m, m, dtype=torch.bool).tril()
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
    batch = collate(pairs, True, pad_id=2, packed=packed)
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


def test_resolve_packed_attention():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert attention.resolve_packed_attention("auto", cpu, "sdpa") == "dense"
    assert attention.resolve_packed_attention("auto", cuda, "sdpa") == "flex"
    assert attention.resolve_packed_attention("auto", cuda, "flash_attention_2") == "dense"  # its own varlen
    assert attention.resolve_packed_attention("dense", cuda, "sdpa") == "dense"
    with pytest.raises(ValueError, match="packed_attention=flex"):
        attention.resolve_packed_attention("flex", cpu, "sdpa")
