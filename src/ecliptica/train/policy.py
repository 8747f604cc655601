"""One forward for every method: response log-probs (and, when asked, reference log-probs and the
exact token KL) computed from hidden states in chunks.

Only positions that predict a response token go through the LM head, chunk by chunk, with a
hand-written backward that recomputes the chunk's log-softmax in place (the frozen LM head needs no
weight gradient), so no [tokens x vocabulary] fp32 tensor for the batch is ever kept and a chunk holds
at most three [chunk x vocabulary] fp32 buffers at once.
The reference is the same network with the LoRA adapter disabled, run under no_grad: no second copy.
This is an nn.Module so DDP (accelerate) sees one forward and synchronises gradients as usual.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..losses import SequenceStats
from .attention import document_block_mask, packed_forward, use_packed_flex, use_packed_varlen
from .batching import ModelBatch
from .offload import HostOffload


def _chunk_logps_kl(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ref_h: torch.Tensor | None):
    """log p(target) for one chunk; with `ref_h`, also the reference's log p(target) and KL(policy || ref).

    The reference log-softmax is rebuilt from its hidden states here (under no_grad) rather than passed
    in, so activation checkpointing saves a [chunk, H] bf16 tensor instead of a [chunk, V] fp32 one."""
    logits = F.linear(h, weight).float()
    logprobs = torch.log_softmax(logits, dim=-1)
    logp = logprobs.gather(-1, targets[:, None]).squeeze(-1)
    if ref_h is None:
        return logp, None, None
    with torch.no_grad():
        ref_lp = torch.log_softmax(F.linear(ref_h, weight).float(), dim=-1)
        ref_logp = ref_lp.gather(-1, targets[:, None]).squeeze(-1)
    kl = (logprobs.exp() * (logprobs - ref_lp)).sum(-1)
    return logp, ref_logp, kl


def _log_softmax_(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last dim, in place (fp32 logits)."""
    logits -= logits.amax(-1, keepdim=True)
    logits -= logits.exp().sum(-1, keepdim=True).log_()
    return logits


# Rows per block of _rowwise_dot: a [rows x vocabulary] fp32 product at a time (64 x 128,256 x 4 B = 31 MiB).
DOT_ROWS = 64


def _rowwise_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_v a[n, v] * b[n, v] for each row, in the inputs' fp32, a block of DOT_ROWS rows at a time. A bmm here
    would be cast to bf16 by autocast (two bf16 copies of the [chunk x vocabulary] operands, the size of one more
    fp32 buffer, at the chunk's peak) and would sum bf16-rounded terms."""
    out = torch.empty(a.shape[0], device=a.device, dtype=torch.float32)
    for s in range(0, a.shape[0], DOT_ROWS):
        torch.sum(a[s : s + DOT_ROWS] * b[s : s + DOT_ROWS], dim=-1, out=out[s : s + DOT_ROWS])
    return out


class _FrozenHeadChunk(torch.autograd.Function):
    """Per-token log p(target), and with reference hidden states also the reference's log p(target) and
    KL(policy || ref), for one chunk through a frozen LM head. Saves only the [chunk, H] inputs; the
    backward rebuilds the log-softmax and forms d/dlogits = g_lp * (onehot - p) + g_kl * p * (log p - log q - KL)."""

    @staticmethod
    def forward(ctx, h, weight, targets, ref_h):
        logprobs = _log_softmax_(F.linear(h, weight).float())
        logp = logprobs.gather(-1, targets[:, None]).squeeze(-1)
        ref_logp = kl = None
        if ref_h is not None:
            diff = _log_softmax_(F.linear(ref_h, weight).float())
            ref_logp = diff.gather(-1, targets[:, None]).squeeze(-1)
            diff.neg_().add_(logprobs)  # log p - log q, in the reference's buffer
            kl = _rowwise_dot(logprobs.exp_(), diff)  # sum_v p (log p - log q)
        ctx.save_for_backward(h, weight, targets, ref_h)
        dev = h.device.type  # the backward recomputes under the forward's autocast state, so both match
        ctx.autocast = (dev, torch.get_autocast_dtype(dev), torch.is_autocast_enabled(dev))
        ctx.mark_non_differentiable(*(t for t in (ref_logp,) if t is not None))
        return logp, ref_logp, kl

    @staticmethod
    def backward(ctx, g_logp, g_ref, g_kl):
        h, weight, targets, ref_h = ctx.saved_tensors
        dev, dtype, enabled = ctx.autocast
        with torch.autocast(dev, dtype=dtype, enabled=enabled):
            return _FrozenHeadChunk._backward(h, weight, targets, ref_h, g_logp, g_kl)

    @staticmethod
    def _backward(h, weight, targets, ref_h, g_logp, g_kl):
        logprobs = _log_softmax_(F.linear(h, weight).float())
        if g_logp is None:
            g_logp = torch.zeros(h.shape[0], device=h.device, dtype=torch.float32)
        if ref_h is not None and g_kl is not None:
            diff = _log_softmax_(F.linear(ref_h, weight).float()).neg_().add_(logprobs)
            p = logprobs.exp_()
            kl = _rowwise_dot(p, diff).view(-1, 1)
            grad = diff.sub_(kl).mul_(g_kl.float()[:, None]).sub_(g_logp.float()[:, None]).mul_(p)
            del logprobs, p
        else:
            grad = logprobs.exp_().mul_(-g_logp.float()[:, None])
        grad.scatter_add_(-1, targets[:, None], g_logp.float()[:, None])
        grad_h = grad.to(h.dtype) @ weight
        return grad_h, None, None, None


def chunked_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int,
    ref_hidden: torch.Tensor | None = None,
    with_kl: bool = False,
):
    """Per-token log p(target) under `hidden` (grad) and `ref_hidden` (no grad), and KL(policy || ref).

    hidden, ref_hidden: [N, H]; weight: [V, H]; targets: [N]. Returns (logp [N], ref_logp [N]|None, kl [N]|None).
    """
    logps, ref_logps, kls = [], [], []
    for s in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[s : s + chunk_size], targets[s : s + chunk_size]
        ref_h = ref_hidden[s : s + chunk_size] if ref_hidden is not None else None
        if ref_h is not None and not with_kl:  # reference log-probs only: nothing to keep for the backward
            with torch.no_grad():
                ref_lp = torch.log_softmax(F.linear(ref_h, weight).float(), dim=-1)
                ref_logps.append(ref_lp.gather(-1, t[:, None]).squeeze(-1))
            del ref_lp
            ref_h = None
        if torch.is_grad_enabled() and h.requires_grad and not weight.requires_grad:
            lp, ref_lp_t, kl = _FrozenHeadChunk.apply(h, weight, t, ref_h)
        elif torch.is_grad_enabled() and h.requires_grad:  # a trained LM head: plain autograd, checkpointed
            lp, ref_lp_t, kl = checkpoint(_chunk_logps_kl, h, weight, t, ref_h, use_reentrant=False)
        else:
            lp, ref_lp_t, kl = _chunk_logps_kl(h, weight, t, ref_h)
        logps.append(lp)
        if ref_lp_t is not None:
            ref_logps.append(ref_lp_t.detach())
        if kl is not None:
            kls.append(kl)
    cat = lambda xs: torch.cat(xs) if xs else None  # noqa: E731
    return cat(logps), cat(ref_logps), cat(kls)


class PolicyModel(torch.nn.Module):
    """Wraps a peft causal LM; forward(batch) -> SequenceStats for the loss."""

    def __init__(self, peft_model, chunk_size: int = 1024, packed_attention: str = "dense", offload: bool = False):
        super().__init__()
        self.peft_model = peft_model
        self.chunk_size = chunk_size
        self.attention = packed_attention  # train/attention.py: dense, flex or varlen
        # train/offload.py: with checkpointing, the layers' saved inputs wait for the backward in host memory
        self.offload = HostOffload() if offload else None
        if packed_attention == "flex":
            use_packed_flex(peft_model.get_base_model())
        elif packed_attention == "varlen":
            use_packed_varlen(peft_model.get_base_model())

    @property
    def _no_split_modules(self) -> list[str]:
        """The base model's decoder-layer classes: what accelerate's FSDP2 transformer-based wrap makes one shard unit
        each (it reads this attribute of the model it prepares, this wrapper; without it the whole model would be
        one unit, gathered whole for every forward)."""
        return list(getattr(self.peft_model.get_base_model(), "_no_split_modules", None) or [])

    def _hidden(self, batch: ModelBatch, mask, bounds) -> torch.Tensor:
        lm = self.peft_model.get_base_model()
        # varlen: the boundaries reach the attention function through transformers' **kwargs, and no mask is built
        extra = {} if bounds is None else {"packed_bounds": bounds}
        offload = self.offload if self.offload is not None and torch.is_grad_enabled() else nullcontext()
        with packed_forward() if bounds is not None else nullcontext(), offload:
            out = lm.get_decoder()(
                input_ids=batch.input_ids,
                position_ids=batch.position_ids,
                attention_mask=mask,
                use_cache=False,
                **extra,
            )
        h = out.last_hidden_state
        return h.reshape(-1, h.shape[-1]).index_select(0, batch.predictor_index)

    def forward(
        self,
        batch: ModelBatch,
        need_reference: bool = False,
        need_token_kl: bool = False,
        ref_logps: torch.Tensor | None = None,
    ) -> SequenceStats:
        weight = self.peft_model.get_base_model().get_output_embeddings().weight
        mask, bounds = batch.attention_mask, None
        if mask is None and self.attention == "flex":  # packed: one block mask serves both passes
            mask = document_block_mask(batch.position_ids)
        elif mask is None and self.attention == "varlen":  # packed: sequence boundaries serve both passes
            bounds = batch.bounds
        ref_hidden = None
        if need_token_kl or (need_reference and ref_logps is None):
            with torch.no_grad(), self.peft_model.disable_adapter():
                ref_hidden = self._hidden(batch, mask, bounds)
        hidden = self._hidden(batch, mask, bounds)
        tok_logp, tok_ref, tok_kl = chunked_logps(
            hidden, weight, batch.targets, self.chunk_size, ref_hidden, with_kl=need_token_kl
        )
        n = batch.n_sequences
        seq = batch.seq_index
        logps = torch.zeros(n, device=hidden.device, dtype=torch.float32).index_add(0, seq, tok_logp)
        # counted by index_add, not bincount: bincount waits for the card to learn its output size
        n_tokens = torch.zeros(n, device=seq.device, dtype=seq.dtype).index_add_(0, seq, torch.ones_like(seq))
        if tok_ref is not None and ref_logps is None:
            ref_logps = torch.zeros(n, device=hidden.device, dtype=torch.float32).index_add(0, seq, tok_ref)
        seq_kl = (
            torch.zeros(n, device=hidden.device, dtype=torch.float32).index_add(0, seq, tok_kl.detach().float())
            if tok_kl is not None
            else None
        )
        return SequenceStats(
            logps=logps,
            n_tokens=n_tokens,
            ref_logps=ref_logps,
            token_kl_sum=tok_kl.sum() if tok_kl is not None else None,
            seq_token_kl=seq_kl,
            nll_sum=-tok_logp.sum(),
            labels=batch.labels,
        )
