"""Attention over packed rows without a dense [tokens x tokens] mask.

A packed micro-batch is one row holding several sequences, each restarting its position ids at 0. On the
dense path transformers expands that into a block-diagonal causal mask and SDPA runs over the whole row: every
block between two different sequences is computed and then masked away, and the mask itself is tokens^2.
Two paths avoid that:
- varlen: PyTorch's variable-length FlashAttention (`torch.nn.attention.varlen`), given each sequence's
  boundaries in the row; each sequence attends causally to itself, nothing else is computed.
- flex: a FlexAttention `BlockMask` built from the sequence ids (causal and same sequence): blocks wholly
  between sequences are skipped.

FlexAttention has no backward on CPU and varlen no CPU kernel at all (torch 2.13), so "auto" means varlen on
CUDA (flex when this torch has no varlen) and dense elsewhere. Padded batches (`train.packing: false`) and
generation keep SDPA with transformers' own masks in every mode.
"""

from __future__ import annotations

import inspect
import math
from contextlib import contextmanager

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

NAME = "ecliptica_packed"  # the attention implementation names registered with transformers
VARLEN_NAME = "ecliptica_varlen"
_compiled = None
_varlen_api: dict | None = None  # filled by use_packed_varlen: which keywords this torch's varlen_attn takes
_packed_forward = False  # set around a packed forward that passes sequence boundaries (see packed_forward)


def sequence_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """[R, L] -> which sequence of its row each token belongs to (a sequence starts at every position 0)."""
    return (position_ids == 0).cumsum(-1) - 1


def document_block_mask(position_ids: torch.Tensor) -> BlockMask:
    """Causal attention within each packed sequence, nothing across sequences."""
    seq = sequence_ids(position_ids)
    rows, length = seq.shape

    def same_sequence_causal(b, h, q, kv):
        return (seq[b, q] == seq[b, kv]) & (q >= kv)

    return create_block_mask(
        same_sequence_causal, B=rows, H=None, Q_LEN=length, KV_LEN=length, device=position_ids.device
    )


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
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
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


# ---------------------------------------------------------------------------------------------- varlen
def sequence_bounds(position_ids: torch.Tensor) -> torch.Tensor:
    """[1, L] packed position ids -> int32 [N + 1] offsets where each sequence starts, then L."""
    if position_ids.shape[0] != 1:
        raise ValueError(f"a packed batch is one row, got {position_ids.shape[0]}")
    starts = (position_ids[0] == 0).nonzero().flatten()
    return torch.cat([starts, starts.new_tensor([position_ids.shape[1]])]).to(torch.int32)


def varlen_available() -> bool:
    try:
        from torch.nn.attention import varlen
    except ImportError:
        return False
    return hasattr(varlen, "varlen_attn")


def _varlen_kernel(q, k, v, bounds, max_len: int, scale: float | None):
    """Causal attention within each [bounds[i], bounds[i+1]) of [T, H, D] tensors (FlashAttention, CUDA).
    The keywords differ between torch releases (2.9-2.10: is_causal; later: window_size, scale, enable_gqa)."""
    from torch.nn.attention.varlen import varlen_attn

    api = _varlen_api or _read_varlen_api()
    kw = {}
    if api["window_size"]:
        kw["window_size"] = (-1, 0)  # causal
    else:
        kw["is_causal"] = True
    head_dim = q.shape[-1]
    if api["scale"]:
        kw["scale"] = scale
    elif scale is not None and not math.isclose(scale, head_dim**-0.5):
        q = q * (scale * head_dim**0.5)  # this release always scales by 1/sqrt(head_dim)
    if k.shape[1] != q.shape[1]:
        if api["enable_gqa"]:
            kw["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    return varlen_attn(q, k, v, bounds, bounds, max_len, max_len, **kw)


def _read_varlen_api() -> dict:
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    return {name: name in params for name in ("window_size", "scale", "enable_gqa")}


def varlen_attention_forward(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, packed_bounds=None, **kwargs
):
    """transformers attention interface: varlen FlashAttention when the forward passes `packed_bounds`
    (PolicyModel does for packed rows), SDPA with transformers' mask otherwise."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if packed_bounds is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    if dropout:
        raise ValueError("packed_attention=varlen does not support attention dropout; use packed_attention=dense")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [1, H, T, D] -> [T, H, D]
    dtype = q.dtype
    if dtype not in (torch.float16, torch.bfloat16):
        # fp32 activations (a 4-bit base keeps its norms in fp32): under autocast, SDPA would run in the
        # autocast dtype too; FlashAttention has only 16-bit kernels.
        if torch.is_autocast_enabled(q.device.type):
            half = torch.get_autocast_dtype(q.device.type)
            q, k, v = q.to(half), k.to(half), v.to(half)
        elif q.device.type == "cuda":
            raise ValueError(
                f"packed_attention=varlen needs fp16/bf16 activations or autocast, got {dtype}; "
                "use packed_attention=dense"
            )
    # The longest sequence is at most the row: using the row's length needs no host sync and no extra
    # symbolic size under torch.compile; the kernel's blocks past a sequence's end return at once.
    out = _varlen_kernel(q, k, v, packed_bounds, q.shape[0], scaling).to(dtype)
    return out.unsqueeze(0), None  # [1, T, H, D], the layout transformers expects back


def _varlen_mask(*args, **kwargs):
    """No mask for a packed forward that passes its sequence boundaries; transformers' SDPA mask otherwise."""
    from transformers.masking_utils import sdpa_mask

    return None if _packed_forward else sdpa_mask(*args, **kwargs)


@contextmanager
def packed_forward():
    """Around a decoder call that passes `packed_bounds`: transformers then builds no dense mask for it."""
    global _packed_forward
    _packed_forward = True
    try:
        yield
    finally:
        _packed_forward = False


def use_packed_varlen(model) -> None:
    """Switch a transformers model to the varlen-or-SDPA implementation above."""
    global _varlen_api
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if varlen_available():
        _varlen_api = _read_varlen_api()
    AttentionInterface.register(VARLEN_NAME, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN_NAME, _varlen_mask)
    model.set_attn_implementation(VARLEN_NAME)


def resolve_packed_attention(
    setting: str, device: torch.device, attn_implementation: str | None, has_varlen: bool | None = None
) -> str:
    """'varlen', 'flex' or 'dense' for `train.packed_attention` on this device and attention implementation."""
    if setting == "dense":
        return "dense"
    has_varlen = varlen_available() if has_varlen is None else has_varlen
    if setting in ("flex", "varlen") and (device.type != "cuda" or attn_implementation != "sdpa"):
        raise ValueError(
            f"train.packed_attention={setting} needs a CUDA device (no backward on {device.type}) "
            f"and model.attn_implementation=sdpa (got {attn_implementation!r})"
        )
    if setting == "varlen" and not has_varlen:
        raise ValueError(
            f"train.packed_attention=varlen needs torch.nn.attention.varlen (torch {torch.__version__} "
            "has none); use flex or dense"
        )
    if setting != "auto":
        return setting
    if device.type != "cuda" or attn_implementation != "sdpa":
        return "dense"
    return "varlen" if has_varlen else "flex"
