"""Activation offloading (train/offload.py) on the CPU: the hooks are pointed at CPU tensors (`source="cpu"`),
so every offloaded tensor really is copied out and read back, as it would be from the GPU.

What is shown: with gradient checkpointing the hooks receive each decoder layer's input and nothing the layers
keep inside (a negative control without checkpointing sends many more), and the gradients are bit-for-bit
those of the same step without offloading. The memory it frees on the GPU is measured by
benchmarks/bench_throughput.py (docs/benchmarks.md)."""

import pytest
import torch
from train_helpers import tiny_peft, toy_pairs

from ecliptica.losses.layout import PAIRED
from ecliptica.train.batching import collate
from ecliptica.train.offload import HostOffload, resolve_offload
from ecliptica.train.policy import PolicyModel


class Recording(HostOffload):
    def __init__(self):
        super().__init__(source="cpu", min_bytes=0)
        self.sent = []  # (storage address, shape) of every tensor sent to the host

    def _pack(self, t):
        out = super()._pack(t)
        if not isinstance(out, torch.Tensor):
            assert out[1].data_ptr() != t.data_ptr()  # a copy, not an alias of the device tensor
            self.sent.append((t.data_ptr(), tuple(t.shape)))
        return out


def _step(tiny_model_dir, checkpointing: bool, offload: HostOffload | None):
    """One DPO-shaped forward and backward of a packed batch; returns the adapter's gradients and each
    decoder layer's input (address, shape) as the layer received it."""
    peft_model = tiny_peft(tiny_model_dir)
    if checkpointing:
        base = peft_model.get_base_model()
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    peft_model.train()
    policy = PolicyModel(peft_model, chunk_size=8)
    policy.offload = offload
    inputs = []
    layers = peft_model.get_base_model().get_decoder().layers

    def record(module, args):
        if torch.is_grad_enabled():
            inputs.append((args[0].data_ptr(), tuple(args[0].shape)))

    handles = [layer.register_forward_pre_hook(record) for layer in layers]  # the policy pass (not the reference)
    batch = collate(toy_pairs(4), PAIRED, pad_id=2, packed=True)
    stats = policy(batch, need_reference=True, need_token_kl=True)
    margin = (stats.logps - stats.ref_logps).view(2, -1)
    loss = -torch.nn.functional.logsigmoid(0.1 * (margin[0] - margin[1])).mean() + 0.05 * stats.token_kl_sum
    loss.backward()
    for h in handles:
        h.remove()
    grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    return grads, inputs[: len(layers)]  # the first forward pass's inputs (a recompute may add more)


def test_checkpointed_layer_inputs_go_to_the_host_and_the_gradients_do_not_change(tiny_model_dir):
    plain, _ = _step(tiny_model_dir, checkpointing=True, offload=None)
    rec = Recording()
    offloaded, layer_inputs = _step(tiny_model_dir, checkpointing=True, offload=rec)
    assert set(layer_inputs) <= set(rec.sent)  # every decoder layer's input was sent
    # what else was sent is the final norm's (outside the layers): per-token rows, nothing [tokens x tokens] or
    # [tokens x intermediate] from inside a layer
    tokens = layer_inputs[0][1][:-1]
    assert all(shape[:-1] == tokens and shape[-1] in (1, layer_inputs[0][1][-1]) for _, shape in rec.sent)
    assert rec.offloaded == len(rec.sent) and rec.offloaded_bytes == sum(torch.Size(s).numel() * 4 for _, s in rec.sent)
    assert plain.keys() == offloaded.keys() and len(plain) > 0
    for name, g in plain.items():
        assert torch.equal(g, offloaded[name]), name  # the same bytes come back: bit-for-bit the same step
    assert sum(g.abs().sum() for g in plain.values()) > 0

    # negative control: without checkpointing the same hooks would receive every saved activation
    unchecked = Recording()
    _step(tiny_model_dir, checkpointing=False, offload=unchecked)
    assert len(unchecked.sent) > 4 * len(rec.sent)


def test_offload_skips_what_needs_no_gradient_parameters_and_small_tensors():
    hooks = HostOffload(source="cpu", min_bytes=1024)
    big = torch.randn(64, 8, requires_grad=True) * 1.0  # 2 KiB, needs a gradient: sent
    assert not isinstance(hooks._pack(big), torch.Tensor)
    for kept in (
        torch.randn(64, 8),  # needs no gradient (e.g. the frozen reference's states)
        torch.nn.Parameter(torch.randn(64, 8)),  # a weight
        torch.randn(8, 8, requires_grad=True) * 1.0,  # 256 B, under min_bytes
        torch.arange(512),  # token ids
        torch.randn(64, 8).to_sparse().requires_grad_(),
    ):  # not a dense tensor
        assert hooks._pack(kept) is kept
    assert hooks.offloaded == 1 and hooks.offloaded_bytes == 64 * 8 * 4


def test_resolve_offload():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert resolve_offload("auto", cuda, True) is True
    assert resolve_offload("auto", cuda, False) is False  # without checkpointing everything would cross
    assert resolve_offload("auto", cpu, True) is False
    assert resolve_offload("off", cuda, True) is False
    assert resolve_offload("on", cuda, True) is True
    with pytest.raises(ValueError, match="offload_activations=on needs model.gradient_checkpointing"):
        resolve_offload("on", cuda, False)
    with pytest.raises(ValueError, match="nothing can be offloaded"):  # asked for, cannot take effect: an error
        resolve_offload("on", cpu, True)


def test_offload_setting_reads_yaml_on_off():
    from ecliptica.config import TrainSection

    assert TrainSection.model_validate({"offload_activations": True}).offload_activations == "on"
    assert TrainSection.model_validate({"offload_activations": False}).offload_activations == "off"
    assert TrainSection().offload_activations == "auto"


def test_engine_trains_cita_with_grit_the_same_with_offloading(tmp_path, tiny_model_dir):
    """The whole engine step (CITA, GRIT's factor hooks, checkpointing, 3 steps) with the hooks pointed at the
    CPU: the same losses, adapter and GRIT factors, bit for bit, as without offloading."""
    import json

    from safetensors.torch import load_file

    from ecliptica.config import TrainConfig
    from ecliptica.train.engine import Trainer

    runs = {}
    for offload in (False, True):
        run_dir = tmp_path / str(offload)
        cfg = TrainConfig.model_validate(
            {
                "run_dir": str(run_dir),
                "seed": 3,
                "model": {"name": str(tiny_model_dir), "dtype": "fp32", "gradient_checkpointing": True},
                "lora": {"r": 4, "alpha": 8},
                "method": {"name": "cita", "lambda_kl": 0.05},
                "data": {"limit": 16, "max_length": 160, "max_prompt_length": 96},
                "optimizer": {"name": "grit", "lr": 5e-3},
                "schedule": {"name": "linear", "warmup_steps": 1},
                "train": {"max_steps": 3, "micro_batch_size": 2, "grad_accum": 2, "progress": False},
            }
        )
        trainer = Trainer(cfg).setup()
        hooks = Recording() if offload else None
        policy = trainer.accelerator.unwrap_model(trainer.policy)
        policy.offload = hooks  # on the CPU the engine resolves offloading to off; point it at CPU tensors
        trainer.train()
        runs[offload] = {
            "losses": [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()],
            "adapter": load_file(str(run_dir / "adapter" / "adapter_model.safetensors")),
            "factors": [b.state_dict() for b in trainer.optimizer_hooks.banks],
            "sent": len(hooks.sent) if hooks else 0,
        }
    assert runs[True]["sent"] >= 3 * 2 * 2  # 3 steps x 2 micro-batches x 2 layers at least
    assert runs[True]["losses"] == runs[False]["losses"]
    for k, v in runs[False]["adapter"].items():
        assert torch.equal(runs[True]["adapter"][k], v), k
    for plain, off in zip(runs[False]["factors"], runs[True]["factors"]):
        for k, v in plain.items():
            assert torch.equal(off[k], v), k
    assert any(float(v.abs().sum()) > 0 for f in runs[False]["factors"] for v in f.values())  # hooks did collect
