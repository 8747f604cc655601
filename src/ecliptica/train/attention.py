"""Attention over packed rows without a dense [tokens x tokens] mask.

A packed micro-batch is one row holding several sequences, each restarting its position ids at 0. On the
dense path transformers expands that into a block-diagonal causal mask and SDPA runs over the whole row: every
block between two different sequences is computed and then masked away, and the mask itself is tokens^2.
The flex path gives the decoder a FlexAttention `BlockMask` built from the sequence ids (causal and same
sequence): blocks wholly between sequences are skipped and no dense mask exists.

FlexAttention has no backward on CPU (torch 2.13), so "auto" means flex on CUDA and dense elsewhere. Padded
batches (`train.packing: false`) and generation keep SDPA with transformers' own masks in both modes.
"""
from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

NAME = "ecliptica_packed"  # the attention implementation name registered with transformers
_compiled = None


def sequence_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """[R, L] -> which sequence of its row each token belongs to (a sequence starts at every position 0)."""
    return (position_ids == 0).cumsum(-1) - 1


def document_block_mask(position_ids: torch.Tensor) -> BlockMask:
    """Causal attention within each packed sequence, nothing across sequences."""
    seq = sequence_ids(position_ids)
    rows, length = seq.shape

    def same_sequence_causal(b, h, q, kv):
        return (seq[b, q] == seq[b, kv]) & (q >= kv)

    return create_block_mask(same_sequence_causal, B=rows, H=None, Q_LEN=length, KV_LEN=length,
                             device=position_ids.device)


def _flex(query, key, value, **kwargs):
    """Compiled on CUDA (eager flex materialises the full score matrix); eager elsewhere (CPU tests, no grad)."""
    global _compiled
    if query.device.type != "cuda":
        return flex_attention(query, key, value, **kwargs)
    if _compiled is None:
        _compiled = torch.compile(flex_attention)
    return _compiled(query, key, value, **kwargs)


def packed_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface: flex for a BlockMask, SDPA for anything else."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not isinstance(attention_mask, BlockMask):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if dropout:
        raise ValueError("packed_attention=flex does not support attention dropout; use packed_attention=dense")
    heads, kv_heads = query.shape[1], key.shape[1]
    if heads != kv_heads and heads & (heads - 1):  # flex's GQA wants a power-of-two head count (as transformers)
        key, value = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (key, value))
    out = _flex(query, key, value, block_mask=attention_mask, scale=scaling, enable_gqa=key.shape[1] != heads)
    return out.transpose(1, 2).contiguous(), None


def use_packed_flex(model) -> None:
    """Switch a transformers model to the flex-or-SDPA implementation above (padded masks stay SDPA's)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, packed_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)


def resolve_packed_attention(setting: str, device: torch.device, attn_implementation: str | None) -> str:
    """'flex' or 'dense' for `train.packed_attention` on this device and model attention implementation."""
    if setting == "dense":
        return "dense"
    if setting == "flex" and (device.type != "cuda" or attn_implementation != "sdpa"):
        raise ValueError("train.packed_attention=flex needs a CUDA device (FlexAttention has no backward on "
                         f"{device.type}) and model.attn_implementation=sdpa (got {attn_implementation!r})")
    return "flex" if device.type == "cuda" and attn_implementation == "sdpa" else "dense"
