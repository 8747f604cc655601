"""Model loading: the embedded GGUF, its cached conversion, dtype, LoRA parameter count, 4-bit guard."""

from __future__ import annotations

import time

import pytest
import torch

from ecliptica import models as M
from ecliptica.config import LoraSection, ModelSection
from ecliptica.models import apply_lora, load_model, parameter_counts


def test_embedded_gguf_path_exists():
    p = M.embedded_gguf_path()
    assert p.is_file() and p.name.endswith(".gguf")


def test_embedded_model_dir_is_cached(embedded_dir):
    t0 = time.perf_counter()
    again = M.embedded_model_dir()
    assert time.perf_counter() - t0 < 2.0
    assert again == embedded_dir
    assert (again / "config.json").is_file() and (again / "model.safetensors").is_file()
    assert M.resolve_model_path(M.EMBEDDED_MODEL) == str(embedded_dir)
    assert M.resolve_model_path("/some/local/path") == "/some/local/path"


def test_load_model_fp32(tiny_model_dir):
    model = load_model(ModelSection(name=str(tiny_model_dir), dtype="fp32"))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.config.use_cache is False
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2


def test_lora_trainable_parameter_count(tiny_model_dir):
    model = load_model(ModelSection(name=str(tiny_model_dir), dtype="fp32"))
    base_total = sum(p.numel() for p in model.parameters())
    wrapped = apply_lora(model, LoraSection())  # r = 16, the 7 default projections
    # per layer (in, out): q (32,32) k (32,16) v (32,16) o (32,32) gate (32,64) up (32,64) down (64,32)
    per_layer = 16 * ((32 + 32) + (32 + 16) + (32 + 16) + (32 + 32) + (32 + 64) + (32 + 64) + (64 + 32))
    assert per_layer == 8192
    counts = parameter_counts(wrapped)
    assert counts["trainable"] == 2 * 8192
    assert counts["total"] == base_total + 2 * 8192


def test_lora_smaller_rank_and_targets(tiny_model_dir):
    model = load_model(ModelSection(name=str(tiny_model_dir), dtype="fp32"))
    wrapped = apply_lora(model, LoraSection(r=4, target_modules=["q_proj", "v_proj"]))
    assert parameter_counts(wrapped)["trainable"] == 2 * 4 * ((32 + 32) + (32 + 16))


@pytest.mark.parametrize("four_bit", [False, True])
def test_lora_keeps_the_base_weights_as_loaded_and_checkpoints_the_same_way(tiny_model_dir, four_bit):
    """A 4-bit base (flagged as transformers flags one; bitsandbytes has no CPU path) is prepared as the 16-bit
    one: its non-quantised weights stay bf16 and frozen (peft's prepare_model_for_kbit_training would make
    them fp32: +2 GiB for Llama-3-8B), the adapter is fp32 and trainable, checkpointing is non-reentrant."""
    model = load_model(ModelSection(name=str(tiny_model_dir), dtype="bf16"))
    if four_bit:
        model.is_loaded_in_4bit = True
    wrapped = apply_lora(model, LoraSection(r=4), gradient_checkpointing=True)
    base = {n: p for n, p in wrapped.named_parameters() if "lora_" not in n}
    lora = {n: p for n, p in wrapped.named_parameters() if "lora_" in n}
    assert len(base) == 2 * 9 + 2 and len(lora) == 2 * 7 * 2  # 2 layers: 7 linears + 2 norms; embedding, norm
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in base.values())
    assert all(p.dtype == torch.float32 and p.requires_grad for p in lora.values())
    layers = wrapped.get_base_model().get_decoder().layers
    assert all(layer.gradient_checkpointing for layer in layers)
    assert layers[0]._gradient_checkpointing_func.keywords == {"use_reentrant": False}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error path")
def test_load_in_4bit_without_cuda_raises_clear_error(tiny_model_dir):
    with pytest.raises(RuntimeError, match="load_in_4bit needs"):
        load_model(ModelSection(name=str(tiny_model_dir), load_in_4bit=True))


def test_trust_remote_code_defaults_false(tiny_model_dir, monkeypatch):
    assert ModelSection().trust_remote_code is False
    import transformers

    seen = {}

    def fake(*args, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake)
    for loader in (M.load_tokenizer, M.load_model):
        seen.clear()
        with pytest.raises(RuntimeError, match="stop"):
            loader(ModelSection(name=str(tiny_model_dir)))
        assert seen["trust_remote_code"] is False


def test_resolve_dtype():
    assert M.resolve_dtype("fp32") is torch.float32
    assert M.resolve_dtype("bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        M.resolve_dtype("int8")
    if not torch.cuda.is_available():
        assert M.resolve_dtype("auto") is torch.float32
