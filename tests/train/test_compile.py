"""Regional torch.compile of the decoder layers (train/compile.py) computes what the eager layers compute.

Inductor runs on CPU, so the whole compiled training step is checked here against the eager one: CITA (the
adapter-disabled reference pass, the token KL) with GRIT (its factor hooks on every LoRA layer) under
gradient checkpointing, in fp32 so any difference is the compiler's, not bf16 rounding. In bf16, the compiled
policy and reference passes must round as the eager ones do (the cast emulation)."""

import json

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import cita_grit_config, tiny_lora_llama

from ecliptica.config import TrainConfig
from ecliptica.data import TokenizedPair
from ecliptica.train.compile import resolve_compile
from ecliptica.train.engine import Trainer


def _cfg(run_dir, model_dir, compile_layers):
    return cita_grit_config(run_dir, model_dir, limit=24, lr=5e-3, compile_layers=compile_layers)


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
    assert (
        TrainConfig.model_validate({"model": {"name": "x"}, "train": {"compile_layers": True}}).train.compile_layers
        == "on"
    )


def _lora_llama():
    return tiny_lora_llama(intermediate_size=256, vocab_size=128, b_std=0.1)


def _saved_bytes_and_grads(peft, ids):
    """Bytes autograd keeps for the backward (each storage once), and the LoRA gradients."""
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = peft(input_ids=ids).logits
    logits.square().mean().backward()
    return sum(saved.values()), {n: w.grad for n, w in peft.named_parameters() if w.grad is not None}


def test_activation_budget_saves_less_for_the_backward_and_computes_the_same():
    import torch._functorch.config as functorch

    with functorch.patch(activation_memory_budget=1.0):  # torch's default; restored afterwards
        _check_activation_budget(functorch)


def _check_activation_budget(functorch):
    # (pytest's monkeypatch cannot restore a torch config entry: its undo hides the entry)
    from ecliptica.train.compile import ACTIVATION_MEMORY_BUDGET, compile_decoder_layers

    ids = torch.randint(0, 128, (1, 96), generator=torch.Generator().manual_seed(1))
    _, eager = _saved_bytes_and_grads(_lora_llama(), ids)
    runs = {}
    for budget in (1.0, ACTIVATION_MEMORY_BUDGET):
        torch._dynamo.reset()
        functorch.activation_memory_budget = 1.0
        peft = _lora_llama()
        compile_decoder_layers(peft)  # sets the engine's budget where the user left torch's default
        assert functorch.activation_memory_budget == ACTIVATION_MEMORY_BUDGET
        functorch.activation_memory_budget = budget  # read when the layer compiles, at its first call
        runs[budget] = _saved_bytes_and_grads(peft, ids)
    torch._dynamo.reset()
    # the property: less is kept for the backward (about 18% less here) ...
    assert runs[ACTIVATION_MEMORY_BUDGET][0] < 0.9 * runs[1.0][0]
    # ... and the gradients are still the eager layers' (recomputing repeats the same arithmetic)
    for name, g in eager.items():
        torch.testing.assert_close(runs[ACTIVATION_MEMORY_BUDGET][1][name], g, rtol=1e-5, atol=1e-7)
    # a budget the user chose is left alone
    functorch.activation_memory_budget = 0.5
    compile_decoder_layers(_lora_llama())
    assert functorch.activation_memory_budget == 0.5


def _margins_at_zero_adapter(compiled: bool):
    """bf16 (CPU autocast): the policy pass's and the adapter-disabled reference pass's sequence log-probs with
    a zero adapter, where the two are the same network and the DPO margin is 0 in exact arithmetic."""
    from ecliptica.losses.layout import PAIRED
    from ecliptica.train.batching import collate
    from ecliptica.train.compile import compile_decoder_layers
    from ecliptica.train.policy import PolicyModel

    torch._dynamo.reset()
    peft = _lora_llama()
    for name, w in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.zeros_(w)
    peft.get_base_model().to(torch.bfloat16)
    peft.train()
    if compiled:
        compile_decoder_layers(peft)
    g = torch.Generator().manual_seed(2)
    pairs = [
        TokenizedPair(*(tuple(torch.randint(3, 128, (n,), generator=g).tolist()) for n in (9, 14, 11)), str(i))
        for i in range(4)
    ]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stats = PolicyModel(peft, chunk_size=32)(collate(pairs, PAIRED, pad_id=0, packed=True), need_reference=True)
    torch._dynamo.reset()
    return stats.logps.detach(), stats.ref_logps


def test_compiled_policy_and_reference_passes_round_as_eager_does(monkeypatch):
    """Known answer: a zero adapter makes policy and reference the same network, so their log-probs agree (the
    eager bf16 passes differ only in the LM head's chunked log-softmax). Negative control: without emulating
    eager's casts, inductor's fused fp32 intermediates make the two compiled passes differ far more."""
    import torch._inductor.config as inductor

    from ecliptica.train.compile import EMULATE_PRECISION_CASTS

    assert EMULATE_PRECISION_CASTS
    eager_pol, eager_ref = _margins_at_zero_adapter(compiled=False)
    eager_gap = (eager_pol - eager_ref).abs().max()
    pol, ref = _margins_at_zero_adapter(compiled=True)  # compile_decoder_layers turns the emulation on
    # bit for bit on our CPU; the slack allows another CPU's fp32 reduction order inside the fused norm
    slack = 1e-5
    assert (pol - ref).abs().max() <= 2 * eager_gap + slack
    torch.testing.assert_close(pol, eager_pol, rtol=0, atol=1e-4)

    monkeypatch.setattr("ecliptica.train.compile.EMULATE_PRECISION_CASTS", False)
    with inductor.patch(emulate_precision_casts=inductor.emulate_precision_casts):  # restored afterwards
        fused_pol, fused_ref = _margins_at_zero_adapter(compiled=True)
    assert (fused_pol - fused_ref).abs().max() > 10 * (eager_gap + slack)  # 0.0074 vs 7.6e-6 eager here


def test_a_grit_model_compiled_after_an_adamw_model_in_one_process_collects_factors(monkeypatch):
    """A study worker or a benchmark trains an AdamW run, then a GRIT run, in one process. Dynamo caches the layer
    graph by code, and without guards on module hooks it reused the AdamW model's graph, which has no factor taps:
    GRIT then trained with no factors at all (seen on the GPU; here on the CPU with aot_eager, the same capture)."""
    import functools

    import torch._dynamo.utils as dynamo_utils

    monkeypatch.setattr(
        torch.nn.Module, "compile", functools.partialmethod(torch.nn.Module.compile, backend="aot_eager")
    )
    # torch's default, patched with torch's own context manager (pytest's undo would hide the entry)
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=True):
        opt = _grit_after_adamw()
    assert all(count.grad is not None and float(count.grad) == 32.0 for _, _, count in opt.collector.sums)
    assert dynamo_utils.counters["stats"]["unique_graphs"] <= 2  # the taps do not cost a graph per layer


def _grit_after_adamw():
    import torch._dynamo.utils as dynamo_utils

    from ecliptica.grit import GritConfig, GritOptimizer
    from ecliptica.train.compile import compile_decoder_layers

    torch._dynamo.reset()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    adamw = _lora_llama()
    compile_decoder_layers(adamw)
    adamw(input_ids=ids).logits.square().mean().backward()
    grit_model = _lora_llama()
    compile_decoder_layers(grit_model)
    opt = GritOptimizer(grit_model, GritConfig(lr=1e-3, reproject_steps=0))
    dynamo_utils.counters.clear()
    grit_model(input_ids=ids).logits.square().mean().backward()
    torch._dynamo.reset()
    return opt
