"""Reference log-probs computed once (adapter disabled, no grad) and cached on disk.

The cache key covers the model, the method's layout and the exact token ids of every sequence it scores (data +
template + tokenisation + layout) and the numerics that change the values (dtype, chunking does not), so a changed
input never reuses a stale cache. Stored as safetensors: [examples, roles] summed log-probs, a row per example in
the layout's role order (paired: chosen, rejected).
"""

from __future__ import annotations

import hashlib
import json

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..losses.layout import Layout
from ..models import cache_dir
from .batching import collate


def reference_key(cfg, layout: Layout, examples: list) -> str:
    ids = hashlib.sha256()
    for prompt, response in layout.sequences(examples):
        ids.update(json.dumps([prompt, response]).encode())
    parts = [
        cfg.model.name,
        cfg.model.dtype,
        str(cfg.model.load_in_4bit),
        layout.name,
        ids.hexdigest(),
        str(cfg.train.packing),
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


@torch.no_grad()
def reference_logps(
    policy, examples: list, layout: Layout, pad_id: int, cfg, device, progress: bool = True
) -> torch.Tensor:
    path = cache_dir() / "reference" / f"{reference_key(cfg, layout, examples)}.safetensors"
    if path.is_file():
        return load_file(str(path))["ref_logps"]
    out = torch.zeros(len(examples), len(layout.roles))
    bs = cfg.train.micro_batch_size
    for s in tqdm(range(0, len(examples), bs), desc="reference log-probs", disable=not progress, leave=False):
        group = examples[s : s + bs]
        batch = collate(group, layout, pad_id, packed=cfg.train.packing).to(device)
        with policy.peft_model.disable_adapter():
            stats = policy(batch)
        out[s : s + len(group)] = layout.by_example(stats.logps.float().cpu())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"ref_logps": out}, str(tmp))
    tmp.rename(path)
    return out
