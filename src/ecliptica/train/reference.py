"""Reference log-probs computed once (adapter disabled, no grad) and cached on disk, for every arm and seed that
scores the same sequences with the same network in the same way.

The key is a hash of everything that changes the values (`reference_inputs`): the model's weights (a local
directory's files by name, size and modification time; a hub model by its snapshot), the numerics it runs with
(resolved dtype, 4-bit, attention implementation and packed-attention path, packing, the micro-batch the cache is
computed in, the log-prob chunk size, compiled layers, NF4 kernel, fused LoRA, mixed precision, device type, and
the torch / transformers / peft versions) and the exact token ids of every sequence in the layout's order (data,
split, template, placement, tokenisation and layout). Seeds, learning rates, the method's own settings and the
optimizer are not in it: the reference does not depend on them, so every arm and seed of a study shares one file.

Stored as safetensors (no pickle): `[examples, roles]` summed log-probs, a row per example in the layout's role
order (paired: chosen, rejected), under `$ECLIPTICA_CACHE/reference/<key>.safetensors`, with the key's inputs
beside it as JSON. Written to a process-unique temporary file and renamed, so concurrent writers of one key (study
workers) each leave a whole file, and a reader never sees a torn one.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..losses.layout import Layout
from ..models import cache_dir, resolve_dtype, resolve_model_path
from ..sharding import agree_all
from .batching import collate


@dataclass
class ReferenceCacheUse:
    """What happened to the reference cache in a run, for its summary: `status` hit | built | not used."""

    status: str
    reason: str = ""
    key: str | None = None
    path: str | None = None
    inputs: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"status": self.status, "reason": self.reason, "key": self.key, "path": self.path}


def model_fingerprint(name: str, revision: str | None) -> str:
    """Which weights `name` loads: a local directory by its files' names, sizes and modification times (rewritten
    weights change it), a hub model by the snapshot its files resolve to (a commit), else the name and revision."""
    path = Path(resolve_model_path(name))
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        listing = [(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
        return "dir:" + hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    try:
        from transformers.utils import cached_file

        config = cached_file(name, "config.json", revision=revision)
        if config:
            return f"hub:{name}@{Path(config).parent.name}"  # the snapshot directory is named by its commit
    except (OSError, ValueError):
        pass
    return f"name:{name}@{revision}"


def token_ids_hash(layout: Layout, examples: list) -> str:
    ids = hashlib.sha256()
    for prompt, response in layout.sequences(examples):
        ids.update(json.dumps([list(prompt), list(response)]).encode())
    return ids.hexdigest()


def reference_inputs(cfg, layout: Layout, examples: list, numerics: dict) -> dict:
    """Everything the cached values depend on. `numerics`: the engine's resolved settings (device type, mixed
    precision, packed attention, compiled layers, NF4 kernel, fused LoRA layers)."""
    import peft
    import transformers

    dtype = torch.bfloat16 if cfg.model.load_in_4bit else resolve_dtype(cfg.model.dtype)
    return {
        "model": model_fingerprint(cfg.model.name, cfg.model.revision),
        "dtype": str(dtype),
        "load_in_4bit": cfg.model.load_in_4bit,
        "attn_implementation": cfg.model.attn_implementation,
        "packing": cfg.train.packing,
        "micro_batch_size": cfg.train.micro_batch_size,
        "logp_chunk_size": cfg.train.logp_chunk_size,
        "layout": layout.name,
        "examples": len(examples),
        "token_ids": token_ids_hash(layout, examples),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        **numerics,
    }


def reference_key(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24]


def write_cache(path: Path, values: torch.Tensor, inputs: dict) -> None:
    """Atomic: a process-unique temporary file, then a rename over `path` (the last of concurrent writers wins,
    and every writer writes the same values)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        save_file({"ref_logps": values.contiguous()}, str(tmp), metadata={"inputs": json.dumps(inputs, sort_keys=True)})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_cache(path: Path, shape: tuple[int, int]) -> torch.Tensor | None:
    """The cached values, or None (with a warning saying why) when the file cannot serve: it is then rebuilt."""
    if not path.is_file():
        return None
    try:
        values = load_file(str(path))["ref_logps"]
    except Exception as e:  # noqa: BLE001 - any unreadable file is rebuilt, and said so
        warnings.warn(f"{path}: unreadable ({type(e).__name__}: {e}); computing it again", RuntimeWarning, stacklevel=3)
        return None
    if tuple(values.shape) != shape:
        warnings.warn(
            f"{path}: holds {tuple(values.shape)} log-probs, {shape} expected; computing it again",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return values


@torch.no_grad()
def compute_reference_logps(
    policy, peft_model, examples: list, layout: Layout, pad_id: int, cfg, device, progress: bool = True
) -> torch.Tensor:
    """Reference log-probs of every example, `[examples, roles]`: the policy's forward with the adapter disabled,
    in micro-batches of `train.micro_batch_size` in example order (the same batches whatever the seed). Every
    process computes all of them (under FSDP each forward is a collective, taken by all processes alike)."""
    out = torch.zeros(len(examples), len(layout.roles))
    bs = cfg.train.micro_batch_size
    for s in tqdm(range(0, len(examples), bs), desc="reference log-probs", disable=not progress, leave=False):
        group = examples[s : s + bs]
        batch = collate(group, layout, pad_id, packed=cfg.train.packing).to(device)
        with peft_model.disable_adapter():
            stats = policy(batch)
        out[s : s + len(group)] = layout.by_example(stats.logps.float().cpu())
    return out


def reference_logps(
    policy,
    peft_model,
    examples: list,
    layout: Layout,
    pad_id: int,
    cfg,
    device,
    numerics: dict,
    progress: bool = True,
    write: bool = True,
) -> tuple[torch.Tensor, ReferenceCacheUse]:
    """The cached reference log-probs for these inputs, computed and written (when `write`: the main process) on
    a miss. Returns them with what happened."""
    inputs = reference_inputs(cfg, layout, examples, numerics)
    key = reference_key(inputs)
    path = cache_dir() / "reference" / f"{key}.safetensors"
    cached = read_cache(path, (len(examples), len(layout.roles)))
    # with several processes, a file written by another run between their reads must not leave one process
    # computing (a collective under FSDP) while another does not: they read it only if every one of them can
    if not bool(agree_all(torch.tensor(cached is not None))):
        cached = None
    if cached is not None:
        return cached, ReferenceCacheUse("hit", "read from the cache", key, str(path), inputs)
    values = compute_reference_logps(policy, peft_model, examples, layout, pad_id, cfg, device, progress)
    if write:
        write_cache(path, values, inputs)
    return values, ReferenceCacheUse("built", "no cached file for this key", key, str(path), inputs)
