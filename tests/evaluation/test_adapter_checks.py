"""A bad adapter is one error naming its file and the field or tensor, before evaluation writes anything: a
truncated weights file, non-finite tensors, tensors shaped for another base, an adapter_config.json naming
another base model. An adapter the engine trained evaluates without a false alarm."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ecliptica.cli import main
from ecliptica.config import load_config
from ecliptica.evaluation.config import EvalConfig
from ecliptica.evaluation.model_handle import ModelHandle
from ecliptica.evaluation.runner import run_eval

from .test_embeddings import save_adapter

ROOT = Path(__file__).resolve().parents[2]
WEIGHTS = "adapter_model.safetensors"


def _eval_config(tmp_path, model, adapter) -> EvalConfig:
    """A small evaluation: embeddings and the AQI only."""
    return EvalConfig.model_validate(
        {
            "out_dir": str(tmp_path / "out"),
            "cache_dir": str(tmp_path / "cache"),
            "progress": False,
            "model": {"name": str(model), "dtype": "fp32"},
            "adapter": str(adapter),
            "data": {"limit": 16},
            "embeddings": {"layer_sweep": False},
            "behaviour": {"enabled": False},
            "drift": {"enabled": False},
            "figures": {"enabled": False},
        }
    )


def _cli_eval(tmp_path, model, adapter) -> list[str]:
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(json.dumps(_eval_config(tmp_path, model, adapter).model_dump(mode="json")))
    return ["eval", str(cfg)]


def _error_lines(err: str) -> list[str]:
    return [x for x in err.splitlines() if x.startswith("error:")]


def test_truncated_adapter_weights_are_one_line_naming_the_file(tmp_path, tiny_model_dir, capsys):
    adapter = save_adapter(tiny_model_dir, tmp_path / "adapter", b_scale=1.0)
    weights = adapter / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-200])  # a copy cut short
    capsys.readouterr()
    assert main(_cli_eval(tmp_path, tiny_model_dir, adapter)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(_error_lines(err)) == 1
    assert f"error: {weights}: cannot read the adapter weights" in err and "truncated or corrupt" in err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_nonfinite_adapter_is_refused_before_the_out_dir_is_written(tmp_path, tiny_model_dir, capsys):
    adapter = save_adapter(tiny_model_dir, tmp_path / "adapter", b_scale=1.0)
    weights = adapter / WEIGHTS
    tensors = load_file(str(weights))
    nan_name = sorted(tensors)[3]
    tensors[nan_name] = torch.full_like(tensors[nan_name], float("nan"))
    save_file(tensors, str(weights))
    capsys.readouterr()
    assert main(_cli_eval(tmp_path, tiny_model_dir, adapter)) == 2
    err = capsys.readouterr().err
    assert len(_error_lines(err)) == 1
    assert f"{weights}: 1 of {len(tensors)} tensors are not finite (NaN or inf), e.g. {nan_name}" in err
    assert not (tmp_path / "out").exists()


def _other_base(tmp_path, tiny_model_dir, hidden: int) -> Path:
    """A tiny Llama like the fixture's but `hidden` wide, with the same tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path / f"llama_{hidden}"
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    for f in tiny_model_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("chat_template.jinja", "special_tokens_map.json"):
            shutil.copy(f, out / f.name)
    return out


def test_adapter_shaped_for_another_base_names_the_tensor(tmp_path, tiny_model_dir, capsys):
    wide = _other_base(tmp_path, tiny_model_dir, hidden=48)
    adapter = save_adapter(wide, tmp_path / "adapter", b_scale=1.0)  # r=2 on q_proj, v_proj, down_proj
    config = adapter / "adapter_config.json"  # recorded as trained on the tiny model: only the shapes tell
    config.write_text(json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": str(tiny_model_dir)}))
    capsys.readouterr()
    assert main(_cli_eval(tmp_path, tiny_model_dir, adapter)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(_error_lines(err)) == 1 and "size mismatch" not in err
    # 32 wide: down_proj gives 32 outputs, so its lora_B (rank 2) must be (32, 2); this one is (48, 2). Its lora_A
    # fits (the 64 inputs are the same), as every tensor of a 64-wide projection does: 10 of the 12 do not fit
    assert (
        f"{adapter / WEIGHTS}: tensor base_model.model.model.layers.0.mlp.down_proj.lora_B.weight has shape "
        f"(48, 2), but model.layers.0.mlp.down_proj of the base model needs (32, 2) (10 of 12 tensors do not "
        f"fit); the adapter was trained on another base model"
    ) in err


def test_adapter_of_another_base_model_name_is_refused_before_the_model_loads(tmp_path, tiny_model_dir):
    adapter = save_adapter(tiny_model_dir, tmp_path / "adapter", b_scale=1.0)
    elsewhere = tmp_path / "other-model"  # not loaded: the names alone decide
    with pytest.raises(
        ValueError,
        match=rf"{adapter / 'adapter_config.json'}: base_model_name_or_path is "
        rf"'{tiny_model_dir}', but the configured base model \(model.name\) is "
        rf"'{elsewhere}'",
    ):
        run_eval(_eval_config(tmp_path, elsewhere, adapter))
    assert not (tmp_path / "out").exists()
    # a base with the same architecture under another name: the shapes fit, the name does not
    same_shape = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, same_shape)
    handle = ModelHandle.load(load_config(None, [f"name={same_shape}", "dtype=fp32"], cls=_model_section()))
    with pytest.raises(ValueError, match=r"base_model_name_or_path is .*tiny_llama.*configured base model"):
        handle.set_adapter(adapter)


def _model_section():
    from ecliptica.config import InferenceModelSection

    return InferenceModelSection


def test_model_identity_names_one_model_the_same_however_it_is_written(tmp_path, monkeypatch):
    from ecliptica.models import EMBEDDED_MODEL, model_identity

    # the embedded model: by name, or as the converted copy's directory under any cache key, here or elsewhere
    assert (
        model_identity(EMBEDDED_MODEL)
        == model_identity(f"/home/a/.cache/ecliptica/models/{EMBEDDED_MODEL}-0123456789ab")
        == EMBEDDED_MODEL
    )
    # a hub cache snapshot is its hub id
    assert (
        model_identity("/h/hub/models--HuggingFaceTB--SmolLM2-135M/snapshots/4e5f6a/") == "HuggingFaceTB/SmolLM2-135M"
    )
    assert model_identity("/h/hub/models--gpt2/snapshots/abc") == "gpt2"
    # a local directory by its resolved path: relative, trailing slash and symlink all name it
    (tmp_path / "base").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    assert model_identity("base/") == model_identity(str(tmp_path / "link")) == str((tmp_path / "base").resolve())
    # different models stay different
    assert model_identity("HuggingFaceTB/SmolLM2-135M") != model_identity("HuggingFaceTB/SmolLM2-360M")
    assert model_identity(f"/x/{EMBEDDED_MODEL}-copy") != EMBEDDED_MODEL


def test_an_adapter_the_engine_trained_evaluates_and_a_poisoned_copy_does_not(tmp_path, tiny_model_dir):
    from ecliptica.train import Trainer

    run = tmp_path / "run"
    sets = [
        f"run_dir={run}",
        f"model.name={tiny_model_dir}",
        "train.progress=false",
        "lora.r=4",
        "data.limit=8",
        "data.max_length=128",
        "data.max_prompt_length=64",
        "train.max_steps=2",
        "train.micro_batch_size=2",
        "train.grad_accum=1",
    ]
    Trainer(load_config(ROOT / "configs" / "train_demo_dpo.yaml", sets)).setup().train()
    result = run_eval(_eval_config(tmp_path / "good", tiny_model_dir, run / "adapter"))
    assert result["model"]["adapter"] == str(run / "adapter") and (tmp_path / "good" / "out" / "eval.json").is_file()
    poisoned = tmp_path / "poisoned"
    shutil.copytree(run / "adapter", poisoned)
    tensors = load_file(str(poisoned / WEIGHTS))
    tensors = {k: torch.full_like(t, float("inf")) if "lora_B" in k else t for k, t in tensors.items()}
    save_file(tensors, str(poisoned / WEIGHTS))
    with pytest.raises(ValueError, match=r"tensors are not finite"):
        run_eval(_eval_config(tmp_path / "bad", tiny_model_dir, poisoned))
    assert not (tmp_path / "bad" / "out").exists()
