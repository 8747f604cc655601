"""Reference log-probs computed once (adapter disabled, no grad) and cached on disk.

The cache key covers the model, the exact token ids (data + template + tokenisation) and the
numerics that change the values (dtype, chunking does not), so a changed input never reuses a
stale cache. Stored as safetensors: [pairs, 2] = (chosen, rejected) summed log-probs.
"""
from __future__ import annotations

import hashlib

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..data.tokenize import TokenizedData
from ..models import cache_dir
from .batching import collate


def reference_key(cfg, data: TokenizedData) -> str:
    parts = [cfg.model.name, cfg.model.dtype, str(cfg.model.load_in_4bit), data.fingerprint(), str(cfg.train.packing)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


@torch.no_grad()
def reference_logps(policy, data: TokenizedData, pad_id: int, cfg, device, progress: bool = True) -> torch.Tensor:
    path = cache_dir() / "reference" / f"{reference_key(cfg, data)}.safetensors"
    if path.is_file():
        return load_file(str(path))["ref_logps"]
    out = torch.zeros(len(data.pairs), 2)
    bs = cfg.train.micro_batch_size
    for s in tqdm(range(0, len(data.pairs), bs), desc="reference log-probs", disable=not progress, leave=False):
        pairs = data.pairs[s:s + bs]
        batch = collate(pairs, True, pad_id, packed=cfg.train.packing).to(device)
        with policy.peft_model.disable_adapter():
            stats = policy(batch)
        b = len(pairs)
        out[s:s + b, 0], out[s:s + b, 1] = stats.logps[:b].float().cpu(), stats.logps[b:].float().cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"ref_logps": out}, str(tmp))
    tmp.rename(path)
    return out
