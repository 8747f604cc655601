"""The fused LoRA projection (train/fused_lora.py) computes the LoRA layer: base(x) + s·(x Aᵀ) Bᵀ.

Checked against a float64 hand computation (values and gradients), against peft's own forward under bf16
autocast, through the engine (a whole CITA + GRIT run, fused vs peft's forward, fp32, compiled layers too), and
for what must stay peft's: the adapter-disabled reference pass and layers the fused path cannot take."""

import json

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import cita_grit_config

from ecliptica.config import TrainConfig
from ecliptica.train.engine import Trainer
from ecliptica.train.fused_lora import fuse_lora_layers, fused_lora_forward, resolve_fused_lora

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _one_layer(r=4, alpha=12, dropout=0.0, **extra):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential()
    base.add_module("proj", torch.nn.Linear(8, 6))
    model = get_peft_model(
        base, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=["proj"], **extra)
    )
    torch.nn.init.normal_(model.base_model.model.proj.lora_B["default"].weight, std=0.5)  # B = 0 would hide it
    return model, model.base_model.model.proj


def _hand(layer, x):
    """float64: x Wᵀ + b + (alpha / r) · (x Aᵀ) Bᵀ, from the raw parameters."""
    w, b = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    a, bb = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    return x.double() @ w.T + b + (12 / 4) * (x.double() @ a.T) @ bb.T


def test_fused_forward_and_gradients_match_the_hand_computation():
    model, layer = _one_layer()
    assert fuse_lora_layers(model) == 1
    assert layer.scaling["default"] == 3.0  # alpha / r: the scale must not be 1, or it could go missing
    x = torch.randn(2, 5, 8, requires_grad=True)
    y = model(x)
    torch.testing.assert_close(y.double(), _hand(layer, x.detach()), rtol=1e-6, atol=1e-6)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    # the same gradients in float64 from the hand formula
    xd = x.detach().double().requires_grad_()
    a = layer.lora_A["default"].weight.detach().double().requires_grad_()
    b = layer.lora_B["default"].weight.detach().double().requires_grad_()
    w, bias = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    ((xd @ w.T + bias + 3.0 * (xd @ a.T) @ b.T) * g.double()).sum().backward()
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.lora_A["default"].weight.grad.double(), a.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.lora_B["default"].weight.grad.double(), b.grad, rtol=1e-5, atol=1e-6)


def test_fused_forward_is_what_peft_computes_under_bf16_autocast():
    model, layer = _one_layer()
    x = torch.randn(3, 7, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        peft_out = model(x)
        fuse_lora_layers(model)
        fused_out = model(x)
    assert fused_out.dtype == peft_out.dtype == torch.bfloat16
    truth = _hand(layer, x)
    # both round to bf16 (relative step 2^-8); the fused one rounds once, so it is no further from the truth
    torch.testing.assert_close(fused_out.double(), truth, rtol=2**-7, atol=1e-2)
    assert (fused_out.double() - truth).norm() <= (peft_out.double() - truth).norm() * 1.05


def test_disabled_adapter_is_the_base_layer_alone():
    """The reference pass (adapters disabled) must not see the adapter through the fused path."""
    model, layer = _one_layer()
    fuse_lora_layers(model)
    x = torch.randn(4, 8)
    with model.disable_adapter():
        torch.testing.assert_close(model(x), layer.base_layer(x))
    assert not torch.allclose(model(x), layer.base_layer(x))  # and with it enabled the adapter counts


def test_dropout_is_applied_to_the_adapter_input_only():
    model, layer = _one_layer(dropout=0.5)
    fuse_lora_layers(model)
    model.train()
    x = torch.randn(64, 8)
    torch.manual_seed(5)
    fused = model(x)
    model.eval()  # no dropout: the sum differs, the base part is the same
    assert not torch.allclose(fused, model(x))
    model.train()
    torch.manual_seed(5)
    mask_x = torch.nn.functional.dropout(x, 0.5, training=True)  # the same draw the layer made
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = layer.base_layer(x) + 3.0 * (mask_x @ a.T) @ b.T
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)


def test_layers_the_fused_path_cannot_take_keep_peft_or_raise():
    model, layer = _one_layer(use_dora=True)
    assert fuse_lora_layers(model) == 0 and "forward" not in vars(layer)
    with pytest.raises(ValueError, match=r"train.fused_lora: on, but LoRA layer .*proj has a LoRA variant"):
        fuse_lora_layers(model, required=True)


def test_every_projection_of_a_llama_is_fused():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    model = get_peft_model(
        LlamaForCausalLM(
            LlamaConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=3,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=64,
            )
        ),
        LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS),
    )
    assert fuse_lora_layers(model) == 7 * 3
    fused = [
        m
        for m in model.modules()
        if getattr(m, "forward", None) is not None and getattr(m.forward, "__func__", None) is fused_lora_forward
    ]
    assert len(fused) == 21


def test_resolve_fused_lora_and_yaml_on_off():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_fused_lora("auto", cuda) and not resolve_fused_lora("auto", cpu)
    assert resolve_fused_lora("on", cpu) and not resolve_fused_lora("off", cuda)

    def read(v):
        return TrainConfig.model_validate({"model": {"name": "x"}, "train": {"fused_lora": v}}).train.fused_lora

    assert read(True) == "on" and read(False) == "off"  # YAML's bare on / off
    with pytest.raises(ValueError, match="fused_lora"):
        TrainConfig.model_validate({"model": {"name": "x"}, "train": {"fused_lora": "yes"}})


def _cfg(run_dir, model_dir, fused, compiled):
    return cita_grit_config(run_dir, model_dir, limit=16, lr=1e-3, fused_lora=fused, compile_layers=compiled)


@pytest.mark.parametrize("compiled", ["off", "on"])
def test_a_run_with_the_fused_path_trains_as_peft_does(tmp_path, tiny_model_dir, compiled):
    """CITA (policy and adapter-disabled reference passes) with GRIT (hooks on every LoRA layer), fp32."""
    losses, fused_layers, adapters = {}, {}, {}
    for fused in ("off", "on"):
        run = tmp_path / f"{fused}_{compiled}"
        summary = Trainer(_cfg(run, tiny_model_dir, fused, compiled)).setup().train()
        fused_layers[fused] = summary["fused_lora_layers"]
        losses[fused] = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
        adapters[fused] = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert fused_layers["off"] == 0 and fused_layers["on"] == 2 * 7  # every projection of both layers
    assert len(losses["on"]) == 3 and losses["on"][2] != losses["on"][0]  # it trained
    assert losses["on"] == pytest.approx(losses["off"], rel=1e-5)
    # the trained adapter: after step 1 the LoRA scale (alpha / r = 2) reaches every gradient
    for k, v in adapters["off"].items():
        torch.testing.assert_close(adapters["on"][k], v, rtol=1e-4, atol=1e-6)
