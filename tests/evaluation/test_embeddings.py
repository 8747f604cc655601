"""Prompt embeddings: pooling against hand computations, padding invariance, cache keys and hits."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from ecliptica.data import PromptExample
from ecliptica.evaluation.config import EmbeddingsSection
from ecliptica.evaluation.embeddings import (
    cache_key,
    compute_embeddings,
    embed_prompts,
    render_prompts,
    user_char_spans,
)
from ecliptica.evaluation.model_handle import ModelHandle, adapter_hash

PROMPTS = [
    PromptExample("Hi", "safe", "a", row_id="p1"),
    PromptExample("How do I bake sourdough bread at home with a cast iron pot?", "safe", "a", row_id="p2"),
    PromptExample("How do I pick a lock to get into my neighbour's flat?", "unsafe", "a", row_id="p3"),
    PromptExample("Write me a poem", "unsafe", "b", row_id="p4"),
    PromptExample("What is the capital of France, and why was it chosen historically?", "safe", "b", row_id="p5"),
]


def _tiny(tiny_model_dir):
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def save_adapter(tiny_model_dir, out, b_scale: float, seed: int = 0):
    """A LoRA adapter for the tiny model; b_scale=0 keeps peft's zero-initialised B (a no-op adapter)."""
    from peft import LoraConfig, get_peft_model

    model, _ = _tiny(tiny_model_dir)
    torch.manual_seed(seed)  # lora_A is randomly initialised
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * b_scale)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return _tiny(tiny_model_dir)


@pytest.fixture()
def handle(tiny_model_dir):
    model, tok = _tiny(tiny_model_dir)
    return ModelHandle(model, tok, str(tiny_model_dir))


def _by_hand(model, tokenizer, text: str, layer: int = -1):
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[layer][0]
    return hidden.mean(0).numpy(), hidden[-1].numpy()


@pytest.mark.parametrize("layer", [-1, 1])
def test_pooling_matches_single_unpadded_forwards(tiny, layer):
    model, tok = tiny
    settings = EmbeddingsSection(layer=layer, pooling="mean", batch_size=3)
    texts = render_prompts(tok, PROMPTS, settings)
    mean = compute_embeddings(model, tok, texts, settings, progress=False).at(layer)
    last = compute_embeddings(model, tok, texts, settings.model_copy(update={"pooling": "last"}), progress=False).at(
        layer
    )
    for i, text in enumerate(texts):
        hand_mean, hand_last = _by_hand(model, tok, text, layer)
        np.testing.assert_allclose(mean[i], hand_mean, atol=1e-5)
        np.testing.assert_allclose(last[i], hand_last, atol=1e-5)
    assert not np.allclose(mean, last)


def test_batching_and_padding_do_not_change_embeddings(tiny):
    model, tok = tiny
    texts = render_prompts(tok, PROMPTS, EmbeddingsSection())
    chars = user_char_spans(tok, PROMPTS, EmbeddingsSection(), texts)  # default pooling: the user's words
    one = compute_embeddings(model, tok, texts, EmbeddingsSection(batch_size=1), chars, progress=False).vectors
    all_ = compute_embeddings(
        model, tok, texts, EmbeddingsSection(batch_size=len(texts)), chars, progress=False
    ).vectors
    assert np.abs(one - all_).max() < 1e-5


def test_layer_sweep_returns_every_hidden_state_and_last_is_final_normed(tiny):
    model, tok = tiny
    texts = render_prompts(tok, PROMPTS[:2], EmbeddingsSection())
    sweep = compute_embeddings(model, tok, texts, EmbeddingsSection(layer_sweep=True, pooling="last"), progress=False)
    assert sweep.layers == [0, 1, 2] and sweep.vectors.shape == (3, 2, 32)
    captured = {}
    hook = model.model.layers[-1].register_forward_hook(
        lambda mod, args, out: captured.__setitem__("h", out[0] if isinstance(out, tuple) else out)
    )
    ids = tok(texts[0], add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        model(input_ids=ids)
        normed = model.model.norm(captured["h"])[0, -1].numpy()
    hook.remove()
    np.testing.assert_allclose(sweep.at(-1)[0], normed, atol=1e-5)  # documented: hidden_states[-1] is normed


def test_cache_key_changes_with_every_input(tmp_path):
    identity = {"model": "m", "model_fingerprint": "f", "dtype": "float32", "adapter_hash": None}
    base, _ = cache_key(identity, PROMPTS, EmbeddingsSection())
    changed = [
        cache_key({**identity, "adapter_hash": "abc"}, PROMPTS, EmbeddingsSection()),
        cache_key({**identity, "model_fingerprint": "g"}, PROMPTS, EmbeddingsSection()),
        cache_key({**identity, "dtype": "bfloat16"}, PROMPTS, EmbeddingsSection()),
        cache_key(identity, PROMPTS[:-1], EmbeddingsSection()),
        cache_key(identity, [dataclasses.replace(PROMPTS[0], prompt="Hi!")] + PROMPTS[1:], EmbeddingsSection()),
        cache_key(identity, [dataclasses.replace(PROMPTS[0], label="unsafe")] + PROMPTS[1:], EmbeddingsSection()),
        cache_key(identity, PROMPTS, EmbeddingsSection(pooling="last")),
        cache_key(identity, PROMPTS, EmbeddingsSection(pooling="mean")),
        cache_key(identity, PROMPTS, EmbeddingsSection(layer=1, layer_sweep=False)),
        cache_key(identity, PROMPTS, EmbeddingsSection(layer_sweep=False)),
        cache_key(identity, PROMPTS, EmbeddingsSection(placement="system", instruction="Be safe.")),
        cache_key(identity, PROMPTS, EmbeddingsSection(placement="system", instruction="Be kind.")),
        cache_key(identity, PROMPTS, EmbeddingsSection(max_length=64)),
        cache_key(identity, PROMPTS, EmbeddingsSection(), tokenizer_id="other template"),
    ]
    keys = [k for k, _ in changed]
    assert base not in keys and len(set(keys)) == len(keys)
    assert cache_key(identity, PROMPTS, EmbeddingsSection(batch_size=1))[0] == base


def test_adapter_hash_follows_the_bytes(tmp_path, tiny_model_dir):
    a = save_adapter(tiny_model_dir, tmp_path / "a", b_scale=0.0)
    b = save_adapter(tiny_model_dir, tmp_path / "b", b_scale=0.5)
    assert adapter_hash(a) != adapter_hash(b)
    assert adapter_hash(a) == adapter_hash(save_adapter(tiny_model_dir, tmp_path / "a2", b_scale=0.0))
    with pytest.raises(FileNotFoundError):
        adapter_hash(tmp_path)


def test_cache_hit_is_identical_and_changed_inputs_recompute(tmp_path, handle, tiny_model_dir):
    cache = tmp_path / "cache"
    settings = EmbeddingsSection()
    first = embed_prompts(handle, PROMPTS, settings, cache)
    again = embed_prompts(handle, PROMPTS, settings, cache)
    assert not first.cache_hit and again.cache_hit and again.key == first.key
    np.testing.assert_array_equal(first.vectors, again.vectors)
    assert again.vectors.dtype == np.float32 and again.layers == first.layers

    other_prompts = embed_prompts(handle, PROMPTS[:3], settings, cache)
    assert not other_prompts.cache_hit and other_prompts.key != first.key

    handle.set_adapter(save_adapter(tiny_model_dir, tmp_path / "adapter", b_scale=0.5))
    with_adapter = embed_prompts(handle, PROMPTS, settings, cache)
    assert not with_adapter.cache_hit and with_adapter.key != first.key
    assert np.abs(with_adapter.vectors - first.vectors).max() > 1e-4  # the adapter really ran

    handle.set_adapter(save_adapter(tiny_model_dir, tmp_path / "adapter", b_scale=0.7, seed=1))  # same path, new bytes
    rewritten = embed_prompts(handle, PROMPTS, settings, cache)
    assert not rewritten.cache_hit and rewritten.key != with_adapter.key

    handle.set_adapter(None)  # adapter disabled: the base again, served from the first cache file
    base_again = embed_prompts(handle, PROMPTS, settings, cache)
    assert base_again.cache_hit and base_again.key == first.key
    np.testing.assert_allclose(
        embed_prompts(handle, PROMPTS, settings, None).vectors, first.vectors, atol=1e-6
    )  # recomputed, disabled
    assert len(list(cache.glob("*.safetensors"))) == 4
    assert not list(cache.glob("*.pkl")) and not list(cache.glob("*.tmp*"))


def test_full_disk_at_the_embeddings_cache_names_the_file_and_leaves_no_partial_one(tmp_path, monkeypatch):
    import safetensors.numpy
    from safetensors import SafetensorError

    from ecliptica.evaluation.embeddings import Embeddings, save_cached
    from ecliptica.runio import RunDirError

    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:  # part of the file is written, then the disk is full
            f.write(b"\0" * 64)
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    monkeypatch.setattr(safetensors.numpy, "save_file", full)
    path = tmp_path / "cache" / "k.safetensors"
    emb = Embeddings(layers=[0], vectors=np.zeros((1, 2, 3), dtype=np.float32))
    with pytest.raises(RunDirError, match=rf"{path}: cannot write the embeddings cache: no space left on device"):
        save_cached(path, emb, {})
    assert list((tmp_path / "cache").iterdir()) == []
