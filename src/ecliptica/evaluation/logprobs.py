"""Sequence log-probs, reference log-probs and token KL for evaluation, computed by the training
engine's own machinery (`train.policy.PolicyModel`: response tokens only, summed, chunked LM head,
reference = the same network with the adapter disabled), so "log-prob" and "KL to the base" mean
the same thing in training, in drift and in preference accuracy.

Batches are padded (`collate(..., packed=False)`) rather than packed: evaluation runs under any attention
implementation, and packed rows are only isolated from each other by flash-attention kernels.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np
import torch
from tqdm.auto import tqdm

from ecliptica.data import TokenizedPair
from ecliptica.evaluation.inputs import length_sorted_batches, model_device
from ecliptica.losses.layout import CHOSEN_ONLY, PAIRED
from ecliptica.train.batching import collate
from ecliptica.train.policy import PolicyModel


class _NoAdapter:
    """The plain base in the shape PolicyModel expects of a peft model (nothing to disable)."""

    def __init__(self, model):
        self.model = model

    def get_base_model(self):
        return self.model

    def disable_adapter(self):
        return nullcontext()


@torch.inference_mode()
def sequence_scores(
    handle,
    pairs: Sequence[TokenizedPair],
    *,
    with_rejected: bool,
    batch_size: int = 8,
    token_kl: bool = False,
    progress: bool = True,
    desc: str = "scoring",
    reference: bool = True,
) -> dict[str, np.ndarray]:
    """Per pair: `logp_chosen` (and `logp_rejected`), summed over response tokens, under the evaluated
    model; with an adapter set, the same under the base (`ref_*`) and, with `token_kl`, the summed
    token KL(model || base) of the chosen response (`kl_chosen`); `n_chosen` response tokens.
    Without an adapter the model is the base: `ref_*` equal the model's and the KL is 0 (no second pass).
    `reference=False` skips the base pass for callers that need the evaluated model only (`ref_*` then
    equal the model's)."""
    has_adapter = handle.adapter_path is not None
    needs_base = has_adapter and reference
    n = len(pairs)
    layout = PAIRED if with_rejected else CHOSEN_ONLY  # its roles name the outputs: logp_chosen, logp_rejected
    keys = [f"logp_{role}" for role in layout.roles]
    out = {k: np.zeros(n) for k in keys + [f"ref_{k}" for k in keys] + ["kl_chosen"]}
    out["n_chosen"] = np.array([len(p.chosen_ids) for p in pairs], dtype=float)
    batches = list(length_sorted_batches([layout.tokens(p) for p in pairs], batch_size))
    for idx in tqdm(batches, desc=desc, disable=not progress, leave=False):
        with handle.active() as model:
            policy = PolicyModel(model if has_adapter else _NoAdapter(model))
            batch = collate([pairs[i] for i in idx], layout, handle.tokenizer.pad_token_id, packed=False).to(
                model_device(model)
            )
            stats = policy(batch, need_reference=needs_base, need_token_kl=needs_base and token_kl)
        # the layout hands each role's [B] values back (the batch holds them role by role)
        logps = layout.split(stats.logps.double().cpu())
        ref = layout.split(stats.ref_logps.double().cpu()) if needs_base else logps
        for k, role_logps, role_ref in zip(keys, logps, ref):
            out[k][idx] = role_logps.numpy()
            out[f"ref_{k}"][idx] = role_ref.numpy()
        if stats.seq_token_kl is not None:
            out["kl_chosen"][idx] = layout.split(stats.seq_token_kl.double().cpu())[
                layout.roles.index("chosen")
            ].numpy()
    return out
