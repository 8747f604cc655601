"""Regional torch.compile of the decoder layers (train/compile.py) computes what the eager layers compute.

Inductor runs on CPU, so the whole compiled training step is checked here against the eager one: CITA (the
adapter-disabled reference pass, the token KL) with GRIT (its factor hooks on every LoRA layer) under
gradient checkpointing, in fp32 so any difference is the compiler's, not bf16 rounding."""
import json

import pytest
import torch
from safetensors.torch import load_file

from ecliptica.config import TrainConfig
from ecliptica.train.compile import resolve_compile
from ecliptica.train.engine import Trainer


def _cfg(run_dir, model_dir, compile_layers):
    return TrainConfig.model_validate({
        "run_dir": str(run_dir), "seed": 3, "model": {"name": str(model_dir), "dtype": "fp32",
                                                      "gradient_checkpointing": True},
        "lora": {"r": 4, "alpha": 8}, "method": {"name": "cita", "lambda_kl": 0.05},
        "data": {"limit": 24, "max_length": 160, "max_prompt_length": 96},
        "optimizer": {"name": "grit", "lr": 5e-3}, "schedule": {"name": "linear", "warmup_steps": 1},
        "train": {"max_steps": 3, "micro_batch_size": 2, "grad_accum": 2, "progress": False,
                  "compile_layers": compile_layers}})


def test_compiled_layers_train_exactly_like_eager_layers(tmp_path, tiny_model_dir):
    runs = {}
    for mode in ("off", "on"):
        trainer = Trainer(_cfg(tmp_path / mode, tiny_model_dir, mode)).setup()
        summary = trainer.train()
        banks = trainer.optimizer_hooks.banks  # GRIT is its own hooks object (train/optim.py)
        runs[mode] = {
            "compiled": summary["compiled_layers"],
            "losses": [json.loads(x)["loss"] for x in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()],
            "adapter": load_file(str(tmp_path / mode / "adapter" / "adapter_model.safetensors")),
            "factors": [b.state_dict() for b in banks],
        }
    assert runs["off"]["compiled"] == 0 and runs["on"]["compiled"] == 2  # both layers of the tiny model
    assert runs["on"]["losses"] == pytest.approx(runs["off"]["losses"], rel=1e-5)
    for k, v in runs["off"]["adapter"].items():
        torch.testing.assert_close(runs["on"]["adapter"][k], v, rtol=1e-4, atol=1e-6)
    # GRIT's curvature factors come from hooks inside the compiled layers: they must have seen the same tensors
    for eager, comp in zip(runs["off"]["factors"], runs["on"]["factors"]):
        for k, v in eager.items():
            torch.testing.assert_close(comp[k], v, rtol=1e-4, atol=1e-6)
    assert any(float(v.abs().sum()) > 0 for f in runs["off"]["factors"] for v in f.values())  # hooks did collect


def test_resolve_compile():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_compile("auto", cuda) and not resolve_compile("auto", cpu)
    assert resolve_compile("on", cpu) and not resolve_compile("off", cuda)


def test_yaml_on_off_reads_as_the_setting(tmp_path, tiny_model_dir):
    cfg = TrainConfig.model_validate({"model": {"name": str(tiny_model_dir)}, "train": {"compile_layers": False}})
    assert cfg.train.compile_layers == "off"
    assert TrainConfig.model_validate({"model": {"name": "x"}, "train": {"compile_layers": True}}).train.compile_layers == "on"
