"""FSDP2 on the CPU: 2 gloo processes, each holding half of every parameter, train as one process does on the same
global batch: LoRA-DPO with AdamW (loss, LoRA gradients, final adapter) and with GRIT (factors, preconditioned and
reprojected update, a checkpoint written at step 1 and resumed from).

accelerate (1.16) never selects FSDP on the CPU: its state takes the FSDP branch only for GPU-like device types,
so `ACCELERATE_USE_FSDP` on a CPU launch silently gives DDP. The workers below therefore set the distributed type
and the FSDP2 plugin on the state after it is built; from `prepare` on, everything is accelerate's FSDP2 path
(fsdp2_prepare_model, fully_shard per decoder layer) and torch's, on gloo. The run summary's `sharding` and
`shard_units` show that the parameters were sharded, so a run that fell back to DDP fails the test.
"""

import json
import os
import socket

import pytest
import torch
from safetensors.torch import load_file, save_file

from ecliptica.config import TrainConfig

STEPS = 2
GRIT_TOL = {"rtol": 1e-4, "atol": 1e-5}


def _cfg(run_dir, model_dir, micro_batch, optimizer, save_every=0):
    grit = {"reproject_steps": 1, "reproject_warmup": 1} if optimizer == "grit" else {}
    return TrainConfig.model_validate(
        {
            "run_dir": str(run_dir),
            "seed": 3,
            "model": {"name": str(model_dir), "dtype": "fp32"},
            "lora": {"r": 4, "alpha": 8},
            "method": {"name": "dpo"},
            "data": {"limit": 24, "max_length": 160, "max_prompt_length": 96},
            "optimizer": {"name": optimizer, "lr": 5e-3, **({"grit": grit} if grit else {})},
            "schedule": {"name": "constant"},
            "train": {
                "max_steps": STEPS,
                "micro_batch_size": micro_batch,
                "grad_accum": 1,
                "progress": False,
                "mixed_precision": "no",
                "save_every": save_every,
            },
        }
    )


def _train(cfg, record_path, resume=False, stop_after=None):
    """Train, recording before each optimizer step the whole LoRA gradients and after it GRIT's factors."""
    from ecliptica.sharding import full
    from ecliptica.train import Trainer

    trainer = Trainer(cfg).setup()
    record = {}
    step_fn = trainer.optimizer.step

    def recorded_step(*args, **kwargs):
        step = trainer.scheduler.last_epoch  # steps done, restored on resume
        for name, p in trainer.peft_model.named_parameters():
            if p.requires_grad:
                record[f"grad{step}/{name}"] = full(p.grad).detach().clone()
        out = step_fn(*args, **kwargs)
        grit = trainer.optimizer.optimizer
        for i, bank in enumerate(getattr(grit, "banks", [])):
            record[f"factor{step}/a{i}"], record[f"factor{step}/g{i}"] = bank.a_ema.clone(), bank.g_ema.clone()
        return out

    trainer.optimizer.step = recorded_step
    trainer.train(resume=resume, stop_after=stop_after)
    if int(os.environ.get("RANK", "0")) == 0:
        save_file({k: v.contiguous() for k, v in record.items()}, str(record_path))


def _fsdp2_worker(cfg_json, record_path, resume, stop_after):
    import accelerate
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    class CpuFsdp2Accelerator(accelerate.Accelerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.state.distributed_type = DistributedType.FSDP
            self.state.fsdp_plugin = FullyShardedDataParallelPlugin(
                fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True
            )

    accelerate.Accelerator = CpuFsdp2Accelerator  # the engine imports it from accelerate when it sets up
    _train(TrainConfig.model_validate_json(cfg_json), record_path, resume, stop_after)


def _launch_two(cfg, record_path, resume=False, stop_after=None):
    """accelerate's debug_launcher (2 CPU processes) on a free port rather than its fixed 29500, spawned rather than
    forked: a fork after this process has trained (its OpenMP threads started) can hang the children."""
    from accelerate.utils import PrepareForLaunch, patch_environment
    from torch.multiprocessing import start_processes

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with patch_environment(
        world_size=2,
        master_addr="127.0.0.1",
        master_port=str(port),
        accelerate_mixed_precision="no",
        accelerate_use_cpu="yes",
        gloo_socket_ifname="lo",
        omp_num_threads="1",
    ):
        launcher = PrepareForLaunch(_fsdp2_worker, distributed_type="MULTI_CPU")
        args = (cfg.model_dump_json(), str(record_path), resume, stop_after)
        start_processes(launcher, args=args, nprocs=2, start_method="spawn")


def _losses(run_dir):
    return [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_close(a: dict, b: dict, keys, rtol=1e-5, atol=1e-7):
    for k in keys:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture
def single_env(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")


def test_fsdp2_lora_dpo_step_equals_one_process(tmp_path, tiny_model_dir, single_env):
    _train(_cfg(tmp_path / "one", tiny_model_dir, 4, "adamw"), tmp_path / "one.safetensors")
    _launch_two(_cfg(tmp_path / "two", tiny_model_dir, 2, "adamw"), tmp_path / "two.safetensors")
    s1 = json.loads((tmp_path / "one" / "summary.json").read_text())
    s2 = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert (s1["sharding"], s1["shard_units"]) == ("none", 0)
    # sharded, with one unit per decoder layer (2) and the root: not one unit gathered whole, not DDP
    assert (s2["sharding"], s2["shard_units"], s2["num_processes"]) == ("fsdp2", 3, 2)
    assert s2["train_tokens"] == s1["train_tokens"]  # the same pairs were seen
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == STEPS and one[-1] != one[0]  # training moved: the comparison is not trivially equal
    assert two == pytest.approx(one, rel=1e-6, abs=1e-6)
    g1, g2 = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert set(g1) == set(g2) and len(g1) == STEPS * 28  # 2 layers x 7 projections x (A, B), per step
    assert any(float(g1[k].abs().max()) > 0 for k in g1 if k.startswith("grad1/") and "lora_A" in k)
    _assert_close(g2, g1, g1)
    a1 = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    a2 = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert set(a1) == set(a2) and all(a2[k].shape == a1[k].shape for k in a1)  # written whole, not a shard
    _assert_close(a2, a1, a1)


def test_fsdp2_grit_step_with_checkpoint_and_resume_equals_one_process(tmp_path, tiny_model_dir, single_env):
    _train(_cfg(tmp_path / "one", tiny_model_dir, 4, "grit", save_every=1), tmp_path / "one.safetensors")
    two = _cfg(tmp_path / "two", tiny_model_dir, 2, "grit", save_every=1)
    _launch_two(two, tmp_path / "two_a.safetensors", stop_after=1)  # step 1, its checkpoint, then stop
    ckpt1, ckpt2 = tmp_path / "one" / "checkpoints" / "step-1", tmp_path / "two" / "checkpoints" / "step-1"
    o1, o2 = load_file(ckpt1 / "optimizer.safetensors"), load_file(ckpt2 / "optimizer.safetensors")
    assert set(o1) == set(o2) and any(".exp_avg" in k for k in o1)  # AdamW moments and GRIT's factors, whole
    # optimizer state for the LoRA parameters only (2 layers x 7 projections x (A, B)); the comparison below also
    # checks each is whole (the single process's shape)
    assert len({k.split(".")[2] for k in o2 if k.endswith(".exp_avg")}) == 28
    # the reprojection's eigenvectors amplify the last-bit differences of the summation order (factor entries agree
    # to ~1e-7): the projected moments agree to ~1e-5 of their size; a wrong row or shard would be off by O(1)
    _assert_close(o2, o1, o1, **GRIT_TOL)
    _launch_two(two, tmp_path / "two_b.safetensors", resume=True)  # step 2 from the checkpoint
    s2 = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert s2["sharding"] == "fsdp2" and s2["grit"]["active"] and s2["grit"]["reprojections"] == STEPS
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-5, abs=1e-6)
    g1 = load_file(tmp_path / "one.safetensors")
    g2 = {**load_file(tmp_path / "two_a.safetensors"), **load_file(tmp_path / "two_b.safetensors")}
    factors = [k for k in g1 if k.startswith("factor")]
    assert factors and any(float(g1[k].abs().max()) > 0 for k in factors if "/g" in k)
    assert set(g2) == set(g1)
    _assert_close(g2, g1, g1, **GRIT_TOL)
    a1 = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    a2 = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    _assert_close(a2, a1, a1, **GRIT_TOL)
