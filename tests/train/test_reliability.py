"""Run directories that cannot be corrupted: exclusive (two real processes), fresh-or-resume, resumes
that refuse another config or other data, only finite weights written, corrupt checkpoints and torn
logs survived, numbers validated before any work, divergence warnings."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ecliptica.cli import main
from ecliptica.config import load_config
from ecliptica.data import DEMO_PREFERENCES
from ecliptica.runio import LOCK_NAME, RunDirError
from ecliptica.train import NonFiniteError, Trainer
from ecliptica.train.safety import NothingToResumeError, ResumeMismatchError, RunDirInUseError, TrainingWatch

ROOT = Path(__file__).resolve().parents[2]
DEMO_CFG = str(ROOT / "configs" / "train_demo_dpo.yaml")


def _sets(run_dir, model_dir, **extra):
    base = {
        "run_dir": run_dir,
        "model.name": model_dir,
        "train.progress": "false",
        "lora.r": 4,
        "data.limit": 16,
        "data.max_length": 160,
        "data.max_prompt_length": 96,
        "optimizer.lr": "5e-3",
        "schedule.name": "linear",
        "train.max_steps": 4,
        "train.micro_batch_size": 2,
        "train.grad_accum": 1,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _cfg(run_dir, model_dir, **extra):
    return load_config(DEMO_CFG, _sets(run_dir, model_dir, **extra))


def _steps(run_dir):
    return [json.loads(x)["step"] for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir):
    return [json.loads(x)["loss"] for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _cli(*args):
    cmd = [sys.executable, "-m", "ecliptica.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    return cmd, env


# ------------------------------------------------------------------ exclusive run directory


def test_second_train_process_on_one_run_dir_is_refused(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    sets = _sets(run, tiny_model_dir, **{"train.max_steps": 100000})
    cmd, env = _cli("train", DEMO_CFG, *[x for s in sets for x in ("--set", s)])
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (run / "metrics.jsonl").exists() and time.time() < deadline:  # the first one is training
            assert first.poll() is None, "the first run ended early"
            time.sleep(0.2)
        second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)  # refused at once
        assert first.poll() is None  # still training while the second was refused
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert second.returncode == 2
    assert f"in use by process {first.pid}" in second.stderr and str(run) in second.stderr
    steps = _steps(run)
    assert steps == list(range(1, len(steps) + 1))  # one writer: every step logged once, in order


# ------------------------------------------------------------------ fresh run or resume


def test_fresh_run_into_an_earlier_run_stops_before_loading_the_model(tmp_path, tiny_model_dir, capsys):
    run = tmp_path / "run"
    Trainer(_cfg(run, tiny_model_dir, **{"train.max_steps": 3, "train.save_every": 1})).setup().train()
    # the CLI refuses before any model loads (a model that does not exist would fail otherwise)
    rc = main(["train", DEMO_CFG, *[x for s in _sets(run, tmp_path / "no-model") for x in ("--set", s)]])
    assert rc == 2 and "pass --resume to continue it, or --overwrite" in capsys.readouterr().err
    with pytest.raises(RunDirInUseError, match="checkpoints, metrics.jsonl, adapter, summary.json"):
        Trainer(_cfg(run, tiny_model_dir)).setup().train()
    Trainer(_cfg(run, tiny_model_dir, **{"train.max_steps": 2}), overwrite=True).setup().train()
    assert _steps(run) == [1, 2]
    assert not (run / "checkpoints").exists()  # the old run's checkpoints are gone, not mixed in


def test_resume_refuses_another_config_and_names_the_keys(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    Trainer(_cfg(run, tiny_model_dir, **{"train.save_every": 2})).setup().train(stop_after=3)
    with pytest.raises(ResumeMismatchError, match=r"optimizer.lr: 0.005 -> 0.01; seed: 0 -> 7"):
        Trainer(_cfg(run, tiny_model_dir, **{"optimizer.lr": "1e-2", "seed": 7}), resume=True).setup().train()
    assert _steps(run) == [1, 2, 3]  # nothing was written by the refused resume


def _forget_added_settings(run):
    """Make the run's checkpoints look written before train.fused_lora and train.nf4_kernel existed, when
    train.logp_chunk_size's default was 1024."""
    for meta_path in (Path(run) / "checkpoints").glob("step-*/trainer.json"):
        meta = json.loads(meta_path.read_text())
        del meta["config"]["train"]["fused_lora"], meta["config"]["train"]["nf4_kernel"]
        assert meta["config"]["train"]["logp_chunk_size"] == 256
        meta["config"]["train"]["logp_chunk_size"] = 1024
        meta_path.write_text(json.dumps(meta))


def test_a_checkpoint_from_before_an_added_setting_resumes_at_its_default(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    Trainer(_cfg(run, tiny_model_dir, **{"train.max_steps": 3, "train.save_every": 1})).setup().train(stop_after=2)
    _forget_added_settings(run)
    Trainer(_cfg(run, tiny_model_dir, **{"train.max_steps": 3, "train.save_every": 1})).setup().train(resume=True)
    assert _steps(run) == [1, 2, 3]
    # a value other than the default is a change the checkpoint did not have
    run2 = tmp_path / "run2"
    Trainer(_cfg(run2, tiny_model_dir, **{"train.max_steps": 3, "train.save_every": 1})).setup().train(stop_after=2)
    _forget_added_settings(run2)
    with pytest.raises(ResumeMismatchError, match=r"train.fused_lora: None -> 'on'"):
        Trainer(
            _cfg(run2, tiny_model_dir, **{"train.max_steps": 3, "train.save_every": 1, "train.fused_lora": "on"}),
            resume=True,
        ).setup().train()
    with pytest.raises(ResumeMismatchError, match=r"train.nf4_kernel: None -> 'bitsandbytes'"):
        Trainer(
            _cfg(
                run2,
                tiny_model_dir,
                **{"train.max_steps": 3, "train.save_every": 1, "train.nf4_kernel": "bitsandbytes"},
            ),
            resume=True,
        ).setup().train()


def test_resume_refuses_other_data_under_the_same_config(tmp_path, tiny_model_dir):
    data = tmp_path / "pairs.jsonl"
    rows = DEMO_PREFERENCES.read_text().splitlines()[:16]
    data.write_text("\n".join(rows) + "\n")
    run = tmp_path / "run"
    cfg = _cfg(run, tiny_model_dir, **{"train.save_every": 2, "data.path": data})
    Trainer(cfg).setup().train(stop_after=2)
    edited = json.loads(rows[5])
    edited["chosen"] = "A different answer."
    data.write_text("\n".join(rows[:5] + [json.dumps(edited)] + rows[6:]) + "\n")
    with pytest.raises(ResumeMismatchError, match="training data differs"):
        Trainer(cfg).setup().train(resume=True)


def test_extending_max_steps_is_the_one_allowed_change(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    Trainer(_cfg(run, tiny_model_dir, **{"train.max_steps": 3, "train.save_every": 1})).setup().train(stop_after=2)
    Trainer(_cfg(run, tiny_model_dir, **{"train.max_steps": 5, "train.save_every": 1})).setup().train(resume=True)
    assert _steps(run) == [1, 2, 3, 4, 5]


def _snapshot(run_dir):
    """Every file of a run directory with its bytes and modification time."""
    return {
        str(p.relative_to(run_dir)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(Path(run_dir).rglob("*"))
        if p.is_file()
    }


def _no_model_load(monkeypatch):
    """Make loading a model fail loudly, so a refusal is proven to come before it."""
    import ecliptica.train.engine as engine

    def refuse(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(engine, "load_model", refuse)


def _cli_sets(run, model_dir, **extra):
    return [x for s in _sets(run, model_dir, **extra) for x in ("--set", s)]


def test_resume_of_a_finished_run_stops_names_the_differences_and_changes_nothing(
    tmp_path, tiny_model_dir, capsys, monkeypatch
):
    run = tmp_path / "run"
    Trainer(_cfg(run, tiny_model_dir, **{"train.max_steps": 2})).setup().train()  # save_every 0: no checkpoint
    before = _snapshot(run)
    _no_model_load(monkeypatch)
    capsys.readouterr()
    rc = main(
        [
            "train",
            DEMO_CFG,
            *_cli_sets(run, tiny_model_dir, **{"train.max_steps": 2, "optimizer.lr": "1e-3", "seed": 7}),
            "--resume",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert f"{run}: the run is finished (2 steps" in err and "nothing to continue" in err
    assert "optimizer.lr: 0.005 -> 0.001; seed: 0 -> 7" in err and "--overwrite" in err
    # the same configuration: finished all the same
    assert main(["train", DEMO_CFG, *_cli_sets(run, tiny_model_dir, **{"train.max_steps": 2}), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "the run is finished" in err and "differs" not in err
    assert _snapshot(run) == before  # config, metrics, adapter and summary untouched


def test_extending_a_finished_run_needs_a_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    run = tmp_path / "run"
    Trainer(_cfg(run, tiny_model_dir, **{"train.max_steps": 2})).setup().train()  # save_every 0: no checkpoint
    before = _snapshot(run)
    with monkeypatch.context() as m:
        _no_model_load(m)
        with pytest.raises(
            NothingToResumeError,
            match=r"cannot extend the finished run from 2 to train.max_steps=4: "
            r"it has no checkpoint.*--overwrite.*train.save_every > 0",
        ):
            Trainer(_cfg(run, tiny_model_dir, **{"train.max_steps": 4}), resume=True).setup()
    assert _snapshot(run) == before
    # with a checkpoint, a finished run is extended from it
    run2 = tmp_path / "run2"
    Trainer(_cfg(run2, tiny_model_dir, **{"train.max_steps": 3, "train.save_every": 1})).setup().train()
    Trainer(_cfg(run2, tiny_model_dir, **{"train.max_steps": 5, "train.save_every": 1}), resume=True).setup().train()
    assert _steps(run2) == [1, 2, 3, 4, 5]
    assert json.loads((run2 / "summary.json").read_text())["steps"] == 5


def test_resume_of_a_run_that_stopped_before_its_first_checkpoint_is_refused(tmp_path, tiny_model_dir, monkeypatch):
    run = tmp_path / "run"
    cfg = _cfg(run, tiny_model_dir)  # save_every 0
    Trainer(cfg).setup().train(stop_after=2)  # as if killed at step 3
    before = _snapshot(run)
    with monkeypatch.context() as m:
        _no_model_load(m)
        with pytest.raises(
            NothingToResumeError,
            match=r"stopped before its first checkpoint \(it holds metrics.jsonl "
            r"but no checkpoint\).*--overwrite",
        ):
            Trainer(cfg, resume=True).setup()
    assert _snapshot(run) == before
    from ecliptica.train.safety import check_resumable

    check_resumable(tmp_path / "empty", cfg.model_dump(mode="json"))  # nothing there: --resume starts the run
    # a study owns its run directories and its store knows the run is unfinished: it trains it again
    Trainer(cfg, resume=True, restart_without_checkpoint=True).setup().train()
    assert _steps(run) == [1, 2, 3, 4]


def test_resume_under_another_config_is_refused_before_the_model_loads(tmp_path, tiny_model_dir, monkeypatch):
    run = tmp_path / "run"
    Trainer(_cfg(run, tiny_model_dir, **{"train.save_every": 1})).setup().train(stop_after=2)
    _no_model_load(monkeypatch)
    with pytest.raises(
        ResumeMismatchError,
        match=r"step-2: cannot resume, the configuration differs from the "
        r"checkpoint's in lora.r: 4 -> 8",
    ):
        Trainer(_cfg(run, tiny_model_dir, **{"train.save_every": 1, "lora.r": 8}), resume=True).setup()


def test_corrupt_checkpoint_falls_back_to_the_previous_and_a_torn_log_line_is_tolerated(tmp_path, tiny_model_dir):
    full = tmp_path / "full"
    Trainer(_cfg(full, tiny_model_dir, **{"train.save_every": 1})).setup().train()
    run = tmp_path / "run"
    cfg = _cfg(run, tiny_model_dir, **{"train.save_every": 1})
    Trainer(cfg).setup().train(stop_after=3)  # checkpoints step-2 and step-3 kept
    weights = run / "checkpoints" / "step-3" / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a disk error / partial copy
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "lo')  # killed mid-write
    with pytest.warns(RuntimeWarning, match=r"step-3: cannot be loaded .*trying the previous checkpoint"):
        Trainer(cfg).setup().train(resume=True)
    assert _steps(run) == [1, 2, 3, 4]
    assert _losses(run) == pytest.approx(_losses(full), rel=1e-5)  # resumed exactly from step 2


# ------------------------------------------------------------------ finite weights only


def _poison_updates(trainer, from_step: int):
    """From optimizer step `from_step` (1-based) on, the update leaves a NaN in one LoRA tensor, as lr=inf does."""
    real, calls = trainer.optimizer.step, {"n": 0}
    target = next(p for n, p in trainer.policy.named_parameters() if "lora_B" in n)

    def step(*a, **k):
        out = real(*a, **k)
        calls["n"] += 1
        if calls["n"] >= from_step:
            with torch.no_grad():
                target.view(-1)[0] = float("nan")
        return out

    trainer.optimizer.step = step


def _all_finite(path):
    return all(bool(torch.isfinite(t).all()) for t in load_file(str(path)).values())


def test_nonfinite_update_stops_and_the_named_checkpoint_is_finite(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    trainer = Trainer(_cfg(run, tiny_model_dir, **{"train.save_every": 1})).setup()
    _poison_updates(trainer, from_step=2)
    with pytest.raises(
        NonFiniteError,
        match=r"non-finite parameters after the optimizer update.* at step 2.*"
        r"Last good checkpoint: .*step-1",
    ):
        trainer.train()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-1"]
    assert _all_finite(run / "checkpoints" / "step-1" / "adapter" / "adapter_model.safetensors")
    assert not (run / "adapter").exists()


def test_skip_undoes_a_nonfinite_update_and_saves_a_finite_adapter(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    trainer = Trainer(_cfg(run, tiny_model_dir, **{"train.max_steps": 3, "train.on_nonfinite": "skip"})).setup()
    _poison_updates(trainer, from_step=1)
    summary = trainer.train()
    assert summary["nonfinite_skipped"] == 3
    weights = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    # every update was undone, so the adapter is still PEFT's initial one: lora_B exactly zero
    b = [t for k, t in weights.items() if "lora_B" in k]
    assert b and all(bool((t == 0).all()) for t in b)


# ------------------------------------------------------------------ a full disk

# what safetensors raises when the disk fills: its own error type, not an OSError
FULL_DISK = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'


def _disk_full_for_final_adapters(monkeypatch):
    """PEFT's adapter writes fail as on a full disk, except inside checkpoints/."""
    import peft.peft_model
    from safetensors import SafetensorError

    real = peft.peft_model.safe_save_file

    def save(tensors, filename, *a, **k):
        if "checkpoints" not in str(filename):
            raise SafetensorError(FULL_DISK)
        return real(tensors, filename, *a, **k)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", save)


def test_full_disk_at_the_final_adapter_is_one_line_and_keeps_the_old_adapter_and_checkpoints(
    tmp_path, tiny_model_dir, capsys, monkeypatch
):
    run = tmp_path / "run"
    Trainer(_cfg(run, tiny_model_dir, **{"train.max_steps": 3, "train.save_every": 1})).setup().train()
    old_adapter, old_summary = _snapshot(run / "adapter"), (run / "summary.json").read_bytes()
    _disk_full_for_final_adapters(monkeypatch)
    capsys.readouterr()
    rc = main(
        [
            "train",
            DEMO_CFG,
            *_cli_sets(run, tiny_model_dir, **{"train.max_steps": 5, "train.save_every": 1}),
            "--resume",
        ]
    )
    err = capsys.readouterr().err  # progress bars, then the error
    assert rc == 2 and "Traceback" not in err and len([x for x in err.splitlines() if x.startswith("error:")]) == 1
    assert f"{run / 'adapter'}: cannot write the final adapter: no space left on device" in err
    assert f"the last good checkpoint, {run / 'checkpoints' / 'step-4'}, is kept" in err
    assert _snapshot(run / "adapter") == old_adapter and (run / "summary.json").read_bytes() == old_summary
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".adapter")) == []  # no partial folder left
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-3", "step-4"]
    assert _all_finite(run / "checkpoints" / "step-4" / "adapter" / "adapter_model.safetensors")


def test_full_disk_at_a_checkpoint_names_it_and_keeps_the_previous_one(tmp_path, tiny_model_dir, monkeypatch):
    import errno

    import ecliptica.train.state_io as state_io

    real, calls = state_io.save_file, {"n": 0}

    def save(tensors, filename, *a, **k):  # the second checkpoint's optimizer state fills the disk
        calls["n"] += 1
        if "step-2" in str(filename):
            raise OSError(errno.ENOSPC, "No space left on device")  # a failed write() names no file
        return real(tensors, filename, *a, **k)

    monkeypatch.setattr(state_io, "save_file", save)
    run = tmp_path / "run"
    with pytest.raises(
        RunDirError,
        match=rf"{run / 'checkpoints' / 'step-2'}: cannot write the checkpoint: no space "
        rf"left on device; the last good checkpoint, .*step-1, is kept",
    ):
        Trainer(_cfg(run, tiny_model_dir, **{"train.save_every": 1})).setup().train()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-1"]  # no partial step-2, no temp folder
    assert _all_finite(run / "checkpoints" / "step-1" / "adapter" / "adapter_model.safetensors")
    assert json.loads((run / "checkpoints" / "step-1" / "trainer.json").read_text())["step"] == 1


def _lora_bytes_of_the_tiny_model(r=4):
    """fp32 LoRA tensors on the 7 projections of its 2 layers: r x (in + out) values each (hidden 32, 4 heads of 8,
    2 key/value heads, intermediate 64)."""
    in_out = {
        "q": (32, 32),
        "k": (32, 16),
        "v": (32, 16),
        "o": (32, 32),
        "gate": (32, 64),
        "up": (32, 64),
        "down": (64, 32),
    }
    return 2 * sum(r * (i + o) for i, o in in_out.values()) * 4


@pytest.mark.parametrize("save_every, adapters", [(0, 2), (1, 2 + 3 * 3)])
def test_too_little_free_disk_space_is_refused_before_training(
    tmp_path, tiny_model_dir, monkeypatch, save_every, adapters
):
    import shutil

    needed = int(1.5 * adapters * _lora_bytes_of_the_tiny_model()) + 16 * 2**20  # docs/reliability.md
    free = {"bytes": needed - 1}
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=free["bytes"]))
    run = tmp_path / "run"
    cfg = _cfg(run, tiny_model_dir, **{"train.save_every": save_every, "train.keep_checkpoints": 2})
    mib = f"{needed / 2**20:.1f} MiB"
    with pytest.raises(
        RunDirError,
        match=rf"{run}: not enough free disk space: {mib} free, about {mib} needed "
        rf"\(adapter 16.0 KiB",
    ):
        Trainer(cfg).setup()
    assert not (run / "metrics.jsonl").exists()
    free["bytes"] = needed  # just enough
    Trainer(cfg).setup()


# ------------------------------------------------------------------ numbers validated before any work


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.max_steps=0", "max_steps"),
        ("train.max_steps=-3", "max_steps"),
        ("train.grad_accum=0", "grad_accum"),
        ("train.micro_batch_size=0", "micro_batch_size"),
        ("train.log_every=0", "log_every"),
        ("optimizer.lr=inf", "lr"),
        ("optimizer.lr=0", "lr"),
        ("optimizer.lr=nan", "lr"),
        ("method.beta=-1", "beta"),
        ("method.lambda_kl=-0.1", "lambda_kl"),
    ],
)
def test_bad_numbers_fail_when_the_config_loads(tmp_path, capsys, override, key):
    run = tmp_path / "run"
    assert main(["train", DEMO_CFG, "--set", f"run_dir={run}", "--set", override]) == 2
    err = capsys.readouterr().err
    assert key in err and "invalid configuration" in err
    assert not run.exists()  # nothing was started


def test_run_dir_that_is_a_file_fails_before_the_model_loads(tmp_path):
    (tmp_path / "run").write_text("")
    with pytest.raises(RunDirError, match="run: cannot write here"):
        Trainer(_cfg(tmp_path / "run", tmp_path / "no-model")).setup()  # the model is never reached


def test_lock_is_released_when_training_ends_or_fails(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    Trainer(_cfg(run, tiny_model_dir, **{"train.max_steps": 1})).setup().train()
    assert not (run / LOCK_NAME).exists()
    with pytest.raises(RunDirInUseError):
        Trainer(_cfg(run, tiny_model_dir, **{"train.max_steps": 1})).setup().train()
    assert not (run / LOCK_NAME).exists()


def test_training_watch_warns_on_tenfold_loss_rise_and_stuck_gradients():
    w = TrainingWatch()
    assert w.update(1, 0.69, 1.0) == [] and w.update(2, 6.8, 1.0) == []  # under 10x: quiet
    with pytest.warns(RuntimeWarning, match="loss rose from 0.69 to 25 by step 3"):
        assert len(w.update(3, 25.0, 0.5)) == 1
    assert w.update(4, 30.0, 0.5) == []  # said once
    g = TrainingWatch(zero_grad_steps=3)
    for step, norm in enumerate([0.0, 0.0, 1.0, 0.0, 0.0], start=1):  # never three zeros in a row
        assert g.update(step, 0.5, norm) == []
    with pytest.warns(RuntimeWarning, match="gradient norm has been 0 for 3 steps"):
        assert len(g.update(6, 0.5, 0.0)) == 1


def test_all_finite_flags_exactly_nan_and_inf():
    from ecliptica.train.safety import all_finite

    ok = [torch.ones(3), torch.zeros(0), torch.full((2,), 3.0e38)]  # the largest float32s are still finite
    assert bool(all_finite(ok))
    for bad in (float("nan"), float("inf"), -float("inf")):
        assert not bool(all_finite(ok + [torch.tensor([1.0, bad])]))
    assert bool(all_finite([]))
