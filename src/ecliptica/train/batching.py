"""Examples -> model batches. The method's layout (losses/layout.py) says which sequences each example
contributes; packed (default): all sequences of a micro-batch in one row with per-sequence position ids, so no
padding is computed; padded: one row per sequence, right-padded. Either way the batch names, for every response
token, the hidden-state position that predicts it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..losses.layout import Layout
from .attention import sequence_bounds


@dataclass
class ModelBatch:
    input_ids: torch.Tensor  # [R, L]
    position_ids: torch.Tensor  # [R, L]
    attention_mask: torch.Tensor | None  # [R, L] for padded batches; None when packed
    predictor_index: torch.Tensor  # [N] flat index into R*L of the position predicting each response token
    targets: torch.Tensor  # [N] the response tokens
    seq_index: torch.Tensor  # [N] which sequence each response token belongs to
    n_sequences: int
    n_real_tokens: int  # non-padding tokens fed to the model (policy pass)
    # packed: int32 [n_sequences + 1] offsets where each sequence of the row starts, then the row's length
    # (varlen attention's boundaries, known here on the host, so the forward needs no device-to-host wait)
    bounds: torch.Tensor | None = None
    labels: torch.Tensor | None = None  # [B] the layout's per-example labels (unpaired: True = desirable)

    def to(self, device) -> ModelBatch:
        move = lambda t: t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t  # noqa: E731
        return ModelBatch(**{k: move(v) for k, v in self.__dict__.items()})

    def token_mask(self) -> torch.Tensor | None:
        return self.attention_mask


def collate(examples: list, layout: Layout, pad_id: int, packed: bool = True) -> ModelBatch:
    seqs = layout.sequences(examples)
    lengths = [len(p) + len(r) for p, r in seqs]
    width = sum(lengths) if packed else max(lengths)
    rows = 1 if packed else len(seqs)
    ids = torch.full((rows, width), pad_id, dtype=torch.long)
    pos = torch.zeros((rows, width), dtype=torch.long)
    mask = None if packed else torch.zeros((rows, width), dtype=torch.long)
    pred, tgt, seq = [], [], []
    offset = 0
    for k, ((prompt, resp), n) in enumerate(zip(seqs, lengths)):
        row, start = (0, offset) if packed else (k, 0)
        ids[row, start : start + n] = torch.tensor(prompt + resp)
        pos[row, start : start + n] = torch.arange(n)
        if mask is not None:
            mask[row, :n] = 1
        base = row * width + start
        first = base + len(prompt) - 1  # position predicting the first response token
        pred.append(torch.arange(first, first + len(resp)))
        tgt.append(torch.tensor(resp))
        seq.append(torch.full((len(resp),), k))
        offset += n
    bounds = sequence_bounds(pos) if packed else None  # on the host tensor: no device wait
    return ModelBatch(
        ids,
        pos,
        mask,
        torch.cat(pred),
        torch.cat(tgt),
        torch.cat(seq),
        len(seqs),
        sum(lengths),
        bounds,
        layout.labels(examples),
    )


def split_by_tokens(idx: list[int], sizes: list[int], budget: int) -> list[list[int]]:
    """Consecutive groups of `idx` whose summed `sizes` stay within `budget` (an example larger than the
    budget gets a micro-batch of its own). Order is kept, so the step sees the same examples."""
    groups: list[list[int]] = []
    used = budget + 1
    for i, n in zip(idx, sizes):
        if used + n > budget:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += n
    return groups
