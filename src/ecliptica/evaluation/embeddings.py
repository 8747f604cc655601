"""Prompt embeddings from the evaluated model's hidden states, cached on disk as safetensors.

Layers index `hidden_states` as transformers returns them: 0 is the token-embedding output, i is
the output of decoder layer i, and the last entry (-1, the default) is the *final-normed* last
layer for Llama-family models (transformers applies the final RMSNorm to the last hidden state;
checked in tests against `model.model.norm`). A sweep takes every entry 0..L.

Pooling over the rendered prompt (chat template and any system message included):
  mean - masked mean over the real tokens (padding never enters the average);
  last - the last real token (with right padding: position length - 1), i.e. the hidden state that
         predicts the assistant's first token.
Batches are length-sorted and right-padded: under the causal mask real tokens never attend to the
padding and keep positions 0..len-1, so a padded row equals the unpadded forward (tested to 1e-5).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from ecliptica.data import Placement, PromptExample
from ecliptica.evaluation.inputs import encode, length_sorted_batches, model_device, pad_batch, render_user_prompt
from ecliptica.evaluation.prompts import prompts_hash

Pooling = Literal["mean", "last"]
CACHE_VERSION = 1  # bump when the computation changes, so old cache files are never reused


@dataclass(frozen=True)
class EmbedSettings:
    pooling: Pooling = "mean"
    layer: int = -1  # index into hidden_states (see module docstring); ignored when layer_sweep
    layer_sweep: bool = False
    placement: Placement = "none"
    instruction: str | None = None
    max_length: int = 512  # prompt tokens kept (the end: the generation prompt must survive)
    batch_size: int = 16
    progress: bool = True

    def numeric_fields(self) -> dict[str, Any]:
        """What changes the numbers (batch size and progress bars do not)."""
        d = asdict(self)
        for speed_only in ("batch_size", "progress"):
            d.pop(speed_only)
        if d["layer_sweep"]:
            d["layer"] = None
        return d


@dataclass
class Embeddings:
    layers: list[int]  # hidden_states indices, non-negative
    vectors: np.ndarray  # (len(layers), n_prompts, hidden) float32
    key: str = ""
    cache_path: str | None = None
    cache_hit: bool = False
    info: dict[str, Any] = field(default_factory=dict)

    def at(self, layer: int | None = None) -> np.ndarray:
        """(n_prompts, hidden) for one layer; default: the last one computed."""
        if layer is None:
            return self.vectors[-1]
        if layer < 0:
            layer = self.info["num_hidden_states"] + layer
        return self.vectors[self.layers.index(layer)]


def num_hidden_states(model) -> int:
    return int(model.config.num_hidden_layers) + 1


def resolve_layers(settings: EmbedSettings, n_states: int) -> list[int]:
    if settings.layer_sweep:
        return list(range(n_states))
    layer = settings.layer + n_states if settings.layer < 0 else settings.layer
    if not 0 <= layer < n_states:
        raise ValueError(f"layer {settings.layer} out of range: the model has {n_states} hidden states")
    return [layer]


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """hidden (..., batch, seq, dim), right-padded mask (batch, seq) -> (..., batch, dim) in fp32."""
    hidden = hidden.float()
    if pooling == "mean":
        weights = mask.to(hidden.dtype)[..., None]
        return (hidden * weights).sum(-2) / weights.sum(-2)
    if pooling == "last":
        last = (mask.sum(-1) - 1).clamp(min=0)
        return hidden[..., torch.arange(hidden.shape[-3]), last, :]
    raise ValueError(f"pooling must be 'mean' or 'last', got {pooling!r}")


def _forward_hidden(model, ids: torch.Tensor, mask: torch.Tensor):
    try:  # logits of one position only: the LM head over every token is wasted work here
        return model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False,
                     logits_to_keep=1).hidden_states
    except TypeError:
        return model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states


@torch.inference_mode()
def compute_embeddings(model, tokenizer, texts: Sequence[str], settings: EmbedSettings) -> Embeddings:
    """Pooled hidden states of already-rendered prompt texts (no cache), in input order."""
    n_states = num_hidden_states(model)
    layers = resolve_layers(settings, n_states)
    seqs = encode(tokenizer, texts, settings.max_length)
    device = model_device(model)
    out: np.ndarray | None = None
    batches = list(length_sorted_batches([len(s) for s in seqs], settings.batch_size))
    for batch in tqdm(batches, desc="embedding prompts", disable=not settings.progress, leave=False):
        ids, mask = pad_batch([seqs[i] for i in batch], tokenizer.pad_token_id, "right", device)
        states = _forward_hidden(model, ids, mask)
        pooled = pool(torch.stack([states[layer] for layer in layers]), mask, settings.pooling).cpu().numpy()
        if out is None:
            out = np.empty((len(layers), len(seqs), pooled.shape[-1]), dtype=np.float32)
        out[:, batch] = pooled
    info = {"num_hidden_states": n_states, "truncated_prompts": sum(
        len(s) == settings.max_length for s in seqs), "mean_prompt_tokens": float(np.mean([len(s) for s in seqs]))}
    return Embeddings(layers, out, info=info)


def render_prompts(tokenizer, prompts: Sequence[PromptExample], settings: EmbedSettings) -> list[str]:
    return [render_user_prompt(tokenizer, p.prompt, settings.placement, settings.instruction) for p in prompts]


# --------------------------------------------------------------------------- cache


def tokenizer_fingerprint(tokenizer) -> str:
    parts = [type(tokenizer).__name__, str(len(tokenizer)), tokenizer.chat_template or "<fallback template>"]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def cache_key(identity: dict[str, Any], prompts: Sequence[PromptExample], settings: EmbedSettings,
              tokenizer_id: str = "") -> tuple[str, dict[str, Any]]:
    """sha256 over model (name + fingerprint + dtype), adapter bytes, prompts and settings."""
    payload = {
        "version": CACHE_VERSION,
        "model": identity.get("model"),
        "model_fingerprint": identity.get("model_fingerprint"),
        "dtype": identity.get("dtype"),
        "adapter_hash": identity.get("adapter_hash"),
        "tokenizer": tokenizer_id,
        "data_hash": prompts_hash(prompts),
        "settings": settings.numeric_fields(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest(), payload


def save_cached(path: Path, emb: Embeddings, payload: dict[str, Any]) -> None:
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tensors = {"vectors": np.ascontiguousarray(emb.vectors), "layers": np.asarray(emb.layers, dtype=np.int64)}
    save_file(tensors, str(tmp), metadata={"key_payload": json.dumps(payload), "info": json.dumps(emb.info)})
    os.replace(tmp, path)  # atomic: a killed run never leaves a half-written cache file


def load_cached(path: Path) -> Embeddings:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
        vectors, layers = f.get_tensor("vectors"), f.get_tensor("layers")
    return Embeddings([int(x) for x in layers], vectors, info=json.loads(meta.get("info", "{}")))


def embed_prompts(handle, prompts: Sequence[PromptExample], settings: EmbedSettings,
                  cache_dir: str | Path | None = None) -> Embeddings:
    """Embeddings of `prompts` under the handle's current adapter (or the base), cached when asked.

    `handle` is a `ModelHandle`; the cache key covers the base, the adapter bytes, the prompts
    and every setting that changes the numbers, so a changed input is recomputed, never reused.
    """
    key, payload = cache_key(handle.identity(), prompts, settings, tokenizer_fingerprint(handle.tokenizer))
    path = Path(cache_dir) / f"{key}.safetensors" if cache_dir is not None else None
    if path is not None and path.is_file():
        emb = load_cached(path)
        emb.key, emb.cache_path, emb.cache_hit = key, str(path), True
        return emb
    texts = render_prompts(handle.tokenizer, prompts, settings)
    with handle.active() as model:
        emb = compute_embeddings(model, handle.tokenizer, texts, settings)
    emb.key = key
    if path is not None:
        save_cached(path, emb, payload)
        emb.cache_path = str(path)
    return emb
