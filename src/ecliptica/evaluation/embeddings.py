"""Prompt embeddings from the evaluated model's hidden states, cached on disk as safetensors.

Layers index `hidden_states` as transformers returns them: 0 is the token-embedding output, i is
the output of decoder layer i, and the last entry (-1) is the *final-normed* last layer for
Llama-family models (transformers applies the final RMSNorm to the last hidden state; checked in
tests against `model.model.norm`). A sweep (the default) keeps every entry 0..L from the one
forward pass; without a sweep, layer 0 is still kept for the lexical baseline.

Pooling (`EmbeddingsSection.pooling`), always a mean over a span of token positions [start, end):
  prompt - the tokens that overlap the user's own text (default). The span is found by rendering
           the same conversation with a placeholder instead of the user's text: what precedes and
           follows the placeholder (chat template, system prompt, a prepended instruction) is
           matched against the real rendering, and the tokenizer's character offsets map the
           remaining characters to token positions. No template, system or instruction token enters.
  mean   - every real token of the rendered prompt (padding never enters the average);
  last   - the last real token, i.e. the hidden state that predicts the assistant's first token.
The spans are returned per prompt (`Embeddings.info["spans"]`) and written to eval.json.
Batches are length-sorted and right-padded: under the causal mask real tokens never attend to the
padding and keep positions 0..len-1, so a padded row equals the unpadded forward (tested to 1e-5).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ecliptica.data import PromptExample
from ecliptica.evaluation.config import EmbeddingsSection
from ecliptica.evaluation.inputs import encode, length_sorted_batches, model_device, pad_batch, render_user_prompt
from ecliptica.evaluation.prompts import prompts_hash
from ecliptica.runio import write_errors

CACHE_VERSION = 2  # bump when the computation changes, so old cache files are never reused
PLACEHOLDER = "ECLIPTICA_USER_TEXT_PLACEHOLDER"  # stands in for the user's text when locating it


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


def resolve_layers(settings: EmbeddingsSection, n_states: int) -> list[int]:
    """Every layer for a sweep; otherwise layer 0 (the lexical baseline) and the asked-for layer."""
    if settings.layer_sweep:
        return list(range(n_states))
    layer = settings.layer + n_states if settings.layer < 0 else settings.layer
    if not 0 <= layer < n_states:
        raise ValueError(f"embeddings.layer={settings.layer} out of range: the model has {n_states} hidden states")
    return sorted({0, layer})


# --------------------------------------------------------------------------- which tokens are pooled


def render_prompts(tokenizer, prompts: Sequence[PromptExample], settings: EmbeddingsSection) -> list[str]:
    return [render_user_prompt(tokenizer, p.prompt, settings.placement, settings.instruction) for p in prompts]


def user_char_spans(
    tokenizer, prompts: Sequence[PromptExample], settings: EmbeddingsSection, texts: Sequence[str]
) -> list[tuple[int, int]]:
    """Character span [start, end) of each prompt's own text (surrounding whitespace excluded) in `texts[i]`.

    The conversation is rendered once more with PLACEHOLDER as the user's text; the rendered text
    must then be `before + <user text as the template wrote it> + after`. Templates that alter the
    text (Llama 3 trims it) are fine; one that changes anything outside it is an error, never a guess.
    """
    template = render_user_prompt(tokenizer, PLACEHOLDER, settings.placement, settings.instruction)
    if template.count(PLACEHOLDER) != 1:
        raise ValueError(
            f"pooling 'prompt': the chat template renders the user text {template.count(PLACEHOLDER)} "
            "times; use embeddings.pooling: mean"
        )
    before, after = template.split(PLACEHOLDER)
    spans = []
    for p, text in zip(prompts, texts):
        if not (text.startswith(before) and text.endswith(after) and len(text) >= len(before) + len(after)):
            raise ValueError(
                f"pooling 'prompt': prompt {p.row_id!r} renders with a template text that differs "
                "from the placeholder rendering; cannot locate the user's words"
            )
        start, end = len(before), len(text) - len(after)
        words = text[start:end]
        # surrounding whitespace is layout, not the user's words
        spans.append((start + len(words) - len(words.lstrip()), end - (len(words) - len(words.rstrip()))))
    return spans


def token_spans(
    tokenizer, texts: Sequence[str], char_spans: Sequence[tuple[int, int]], lengths: Sequence[int], max_length: int
) -> list[tuple[int, int]]:
    """Token span [start, end) of the tokens overlapping each character span, after left truncation."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("pooling 'prompt' needs a fast tokenizer (character offsets); use embeddings.pooling: mean")
    offsets = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    spans = []
    for offs, (c0, c1), kept in zip(offsets, char_spans, lengths):
        inside = [i for i, (a, b) in enumerate(offs) if a < c1 and b > c0]
        if not inside:
            raise ValueError(f"pooling 'prompt': no token overlaps the user text at characters {c0}..{c1}")
        shift = len(offs) - kept  # tokens dropped at the start by `encode`'s truncation
        start, end = max(inside[0] - shift, 0), inside[-1] + 1 - shift
        if end <= 0:
            raise ValueError(f"pooling 'prompt': the user text was truncated away (max_length={max_length})")
        spans.append((start, end))
    return spans


def pooled_spans(
    tokenizer,
    texts: Sequence[str],
    seqs: Sequence[Sequence[int]],
    settings: EmbeddingsSection,
    char_spans: Sequence[tuple[int, int]] | None,
) -> list[tuple[int, int]]:
    lengths = [len(s) for s in seqs]
    if settings.pooling == "mean":
        return [(0, n) for n in lengths]
    if settings.pooling == "last":
        return [(n - 1, n) for n in lengths]
    if char_spans is None:
        raise ValueError("pooling 'prompt' needs the character span of each prompt's user text (user_char_spans)")
    return token_spans(tokenizer, texts, char_spans, lengths, settings.max_length)


def pool(hidden: torch.Tensor, spans: Sequence[tuple[int, int]]) -> torch.Tensor:
    """hidden (..., batch, seq, dim) -> (..., batch, dim) in fp32: the mean over each row's span."""
    hidden = hidden.float()
    positions = torch.arange(hidden.shape[-2], device=hidden.device)
    bounds = torch.tensor(spans, device=hidden.device)
    weights = ((positions >= bounds[:, :1]) & (positions < bounds[:, 1:])).to(hidden.dtype)[..., None]
    return (hidden * weights).sum(-2) / weights.sum(-2)


def _forward_hidden(model, ids: torch.Tensor, mask: torch.Tensor):
    try:  # logits of one position only: the LM head over every token is wasted work here
        return model(
            input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False, logits_to_keep=1
        ).hidden_states
    except TypeError:
        return model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states


@torch.inference_mode()
def compute_embeddings(
    model,
    tokenizer,
    texts: Sequence[str],
    settings: EmbeddingsSection,
    char_spans: Sequence[tuple[int, int]] | None = None,
    progress: bool = True,
) -> Embeddings:
    """Pooled hidden states of already-rendered prompt texts (no cache), in input order.

    `char_spans`: the user text's character span in each text (`user_char_spans`), needed for
    `pooling: prompt`.
    """
    n_states = num_hidden_states(model)
    layers = resolve_layers(settings, n_states)
    seqs = encode(tokenizer, texts, settings.max_length)
    spans = pooled_spans(tokenizer, texts, seqs, settings, char_spans)
    device = model_device(model)
    out: np.ndarray | None = None
    batches = list(length_sorted_batches([len(s) for s in seqs], settings.batch_size))
    for batch in tqdm(batches, desc="embedding prompts", disable=not progress, leave=False):
        ids, mask = pad_batch([seqs[i] for i in batch], tokenizer.pad_token_id, "right", device)
        states = _forward_hidden(model, ids, mask)
        pooled = pool(torch.stack([states[layer] for layer in layers]), [spans[i] for i in batch]).cpu().numpy()
        if out is None:
            out = np.empty((len(layers), len(seqs), pooled.shape[-1]), dtype=np.float32)
        out[:, batch] = pooled
    pooled_counts = [end - start for start, end in spans]
    info = {
        "num_hidden_states": n_states,
        "pooling": settings.pooling,
        "truncated_prompts": sum(len(s) == settings.max_length for s in seqs),
        "mean_prompt_tokens": float(np.mean([len(s) for s in seqs])),
        "mean_pooled_tokens": float(np.mean(pooled_counts)),
        "min_pooled_tokens": int(min(pooled_counts)),
        "max_pooled_tokens": int(max(pooled_counts)),
        "spans": [[int(a), int(b)] for a, b in spans],
        "prompt_tokens": [len(s) for s in seqs],
    }
    return Embeddings(layers, out, info=info)


# --------------------------------------------------------------------------- cache


def tokenizer_fingerprint(tokenizer) -> str:
    parts = [type(tokenizer).__name__, str(len(tokenizer)), tokenizer.chat_template or "<fallback template>"]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def cache_key(
    identity: dict[str, Any], prompts: Sequence[PromptExample], settings: EmbeddingsSection, tokenizer_id: str = ""
) -> tuple[str, dict[str, Any]]:
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

    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tensors = {"vectors": np.ascontiguousarray(emb.vectors), "layers": np.asarray(emb.layers, dtype=np.int64)}
    # a full disk is named with the cache file (safetensors' own error names none) and leaves no partial file
    with write_errors(path, "the embeddings cache", "set cache_dir to a disk with space"):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(tmp), metadata={"key_payload": json.dumps(payload), "info": json.dumps(emb.info)})
            os.replace(tmp, path)  # atomic: a killed run never leaves a half-written cache file
        finally:
            tmp.unlink(missing_ok=True)


def load_cached(path: Path) -> Embeddings:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
        vectors, layers = f.get_tensor("vectors"), f.get_tensor("layers")
    return Embeddings([int(x) for x in layers], vectors, info=json.loads(meta.get("info", "{}")))


def embed_prompts(
    handle,
    prompts: Sequence[PromptExample],
    settings: EmbeddingsSection,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> Embeddings:
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
    chars = user_char_spans(handle.tokenizer, prompts, settings, texts) if settings.pooling == "prompt" else None
    with handle.active() as model:
        emb = compute_embeddings(model, handle.tokenizer, texts, settings, chars, progress)
    emb.key = key
    if path is not None:
        save_cached(path, emb, payload)
        emb.cache_path = str(path)
    return emb
