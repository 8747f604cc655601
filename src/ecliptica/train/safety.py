"""What keeps a run directory honest: fresh-or-resume decisions, resume checks, finite weights, and
warnings for training that has visibly gone wrong. The engine calls these; each is small and pure
enough to test on its own. docs/reliability.md states the guarantees.
"""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from pathlib import Path

import torch
import yaml

from ..config import without_added_defaults
from ..sharding import agree_all, full, local

# Keys a resume may change: extending a finished or interrupted run (the schedule is recomputed for
# the new length from the checkpoint's step on), and whether a progress bar is drawn.
RESUME_MAY_CHANGE = ("train.max_steps", "train.progress")

# What a previous run leaves in its directory; a fresh run must not mix with any of it (--overwrite also
# deletes its TensorBoard events, which alone do not mark a run: setup may create that folder).
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "adapter", "summary.json")


class ResumeMismatchError(ValueError):
    pass


class RunDirInUseError(ValueError):
    pass


class NothingToResumeError(ValueError):
    """`--resume` on a run directory whose run cannot be continued from a checkpoint."""


def previous_run_outputs(run_dir: Path) -> list[str]:
    return [name for name in RUN_OUTPUTS if (run_dir / name).exists()]


def check_fresh_start(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """A fresh run into a directory holding another run's outputs stops, unless told which to do."""
    found = previous_run_outputs(run_dir)
    if resume or not found:
        return
    if not overwrite:
        raise RunDirInUseError(
            f"{run_dir} already holds a run ({', '.join(found)}); pass --resume to continue "
            f"it, or --overwrite to delete it and start again"
        )
    for name in (*found, "tb"):
        p = run_dir / name
        if not p.exists():
            continue
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Checkpoints whose trainer.json (written last) exists, oldest first."""
    return sorted(
        (p for p in ckpt_root.glob("step-*") if (p / "trainer.json").is_file()), key=lambda p: int(p.name.split("-")[1])
    )


def finished_steps(run_dir: Path) -> int | None:
    """The step count of a finished run (its final adapter/ and summary.json are both written), else None."""
    summary = run_dir / "summary.json"
    if not (summary.is_file() and (run_dir / "adapter").is_dir()):
        return None
    try:
        return int(json.loads(summary.read_text())["steps"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"{summary}: unreadable run summary ({type(e).__name__}: {e}); start again with --overwrite"
        ) from None


def recorded_config(run_dir: Path) -> tuple[Path, dict] | None:
    """The configuration a run was trained under: its newest checkpoint's (what resume continues), else the
    config.yaml written when it started; None when neither can be read."""
    for ckpt in reversed(complete_checkpoints(run_dir / "checkpoints")):
        try:
            meta = json.loads((ckpt / "trainer.json").read_text())
        except ValueError:
            continue  # resume_latest warns about it and falls back to an older checkpoint
        return (ckpt, meta["config"]) if "config" in meta else None
    path = run_dir / "config.yaml"
    try:
        return (path, yaml.safe_load(path.read_text())) if path.is_file() else None
    except yaml.YAMLError:
        return None


def check_resumable(run_dir: Path, config: dict) -> None:
    """What `--resume` cannot continue, refused before the model loads instead of silently trained again from
    step 0: a finished run asked for no more steps; a finished run asked for more but with no checkpoint to
    continue from (`train.save_every: 0` keeps only the final adapter, without optimizer state); a run that
    stopped before its first checkpoint. A configuration that differs from the run's is named key by key, as
    check_resume does. An empty run directory is not refused: --resume then starts the run."""
    found = previous_run_outputs(run_dir)
    if not found:
        return
    recorded = recorded_config(run_dir)
    diff = config_differences(recorded[1], config) if recorded else {}
    done, max_steps = finished_steps(run_dir), config["train"]["max_steps"]
    differs = f"; its configuration also differs from this one in {describe_differences(diff)}" if diff else ""
    if done is not None and max_steps <= done:
        raise NothingToResumeError(
            f"{run_dir}: the run is finished ({done} steps; adapter/ and summary.json are written), so --resume "
            f"has nothing to continue{differs}. To train it longer, raise train.max_steps; to train it again, "
            f"pass --overwrite"
        )
    if diff:
        raise mismatch_error(recorded[0], diff)
    if complete_checkpoints(run_dir / "checkpoints"):
        return  # resume_latest continues from the newest checkpoint that reads back, and checks the data
    if done is not None:
        raise NothingToResumeError(
            f"{run_dir}: cannot extend the finished run from {done} to train.max_steps={max_steps}: it has no "
            f"checkpoint to continue from exactly (train.save_every was 0, so only the final adapter was saved, "
            f"without optimizer state). Train it again with --overwrite, with train.save_every > 0 so that a "
            f"later run can be extended"
        )
    outputs = [n for n in found if n != "checkpoints"]
    held = f"{', '.join(outputs)} but no checkpoint" if outputs else "only an incomplete checkpoint"
    raise NothingToResumeError(
        f"{run_dir}: cannot resume: the run stopped before its first checkpoint (it holds {held}), so there is "
        f"nothing to continue from. Train it again with --overwrite (train.save_every > 0 writes checkpoints to "
        f"resume from)"
    )


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(old: dict, new: dict, allowed=RESUME_MAY_CHANGE) -> dict[str, tuple]:
    # a setting added since `old` was written counts as unchanged while it holds its default (config.ADDED_SETTINGS)
    a, b = flatten(without_added_defaults(old)), flatten(without_added_defaults(new))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if k not in allowed and a.get(k) != b.get(k)}


def describe_differences(diff: dict[str, tuple]) -> str:
    """`optimizer.lr: 0.0005 -> 0.01; seed: 0 -> 7`: every differing key with its old and new value."""
    return "; ".join(f"{k}: {o!r} -> {n!r}" for k, (o, n) in diff.items())


def mismatch_error(source: Path, diff: dict[str, tuple]) -> ResumeMismatchError:
    whose = "the checkpoint's" if source.name != "config.yaml" else "the run's"
    return ResumeMismatchError(
        f"{source}: cannot resume, the configuration differs from {whose} in "
        f"{describe_differences(diff)}. Restore those values, or start again with "
        f"--overwrite (only {', '.join(RESUME_MAY_CHANGE)} may change on resume)"
    )


def check_resume(ckpt: Path, meta: dict, config: dict, data_hash: str, max_steps: int) -> None:
    """Refuse to continue a checkpoint under a different configuration or different data."""
    if "config" not in meta:
        warnings.warn(
            f"{ckpt}: written before resume checks existed; its config and data cannot be verified",
            RuntimeWarning,
            stacklevel=2,
        )
        return
    diff = config_differences(meta["config"], config)
    if diff:
        raise mismatch_error(ckpt, diff)
    if meta.get("data_hash") != data_hash:
        raise ResumeMismatchError(
            f"{ckpt}: cannot resume, the training data differs from the checkpoint's "
            f"(rows, split or tokenisation; data hash {meta.get('data_hash')} vs {data_hash}); "
            f"restore the data or start again with --overwrite"
        )
    if meta["step"] > max_steps:
        raise ResumeMismatchError(
            f"{ckpt}: the checkpoint is at step {meta['step']}, past train.max_steps="
            f"{max_steps}; raise train.max_steps to at least {meta['step']}"
        )


# The disk a run needs, estimated from its adapter (the trainable LoRA tensors, as saved): the final adapter
# twice (the new one is written beside the old before the rename), and with train.save_every, keep_checkpoints + 1
# checkpoints (the newest is written before the oldest is deleted), each the adapter plus AdamW's two moments,
# as large as the adapter each. Times DISK_MARGIN, plus DISK_SLACK for config, metrics, logs and TensorBoard events.
DISK_MARGIN = 1.5
DISK_SLACK = 16 * 2**20
CHECKPOINT_ADAPTERS = 3


def disk_needed(adapter_bytes: int, save_every: int, keep_checkpoints: int) -> tuple[int, str]:
    """(bytes a run needs free before it starts, how that was counted)."""
    from ..runio import format_bytes

    checkpoints = keep_checkpoints + 1 if save_every else 0
    adapters = 2 + CHECKPOINT_ADAPTERS * checkpoints
    detail = f"adapter {format_bytes(adapter_bytes)}, x2 for the final one"
    if checkpoints:
        detail += (
            f", {checkpoints} checkpoints (train.keep_checkpoints={keep_checkpoints}, one more while the "
            f"newest is written) of about {format_bytes(CHECKPOINT_ADAPTERS * adapter_bytes)} each"
        )
    detail += f", x{DISK_MARGIN:g} margin, + {format_bytes(DISK_SLACK)} for logs"
    return int(DISK_MARGIN * adapters * adapter_bytes) + DISK_SLACK, detail


def all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Device bool: every element of every tensor is finite. The infinity norm is NaN or inf exactly when a
    tensor holds a NaN or an inf (it cannot overflow), and one multi-tensor kernel computes all of them, so
    the check costs a few launches instead of several per tensor."""
    # sharded (FSDP2): each process checks its own rows, and the processes agree
    full = [local(t).detach() for t in tensors if local(t).numel()]
    if not full:
        return agree_all(torch.ones((), dtype=torch.bool, device=tensors[0].device if tensors else None))
    return agree_all(torch.isfinite(torch.stack(torch._foreach_norm(full, float("inf")))).all())


def nonfinite_names(named: dict[str, torch.Tensor] | list[tuple[str, torch.Tensor]]) -> list[str]:
    items = named.items() if isinstance(named, dict) else named
    # sharded tensors are gathered whole (every process calls this alike), so every process names the same ones
    return [name for name, t in items if t.is_floating_point() and not bool(torch.isfinite(full(t)).all())]


class UpdateSnapshot:
    """Trainable parameters and optimizer state before an optimizer step, so a non-finite update can be
    undone (`on_nonfinite: skip` then really skips it). Costs one copy of the trainable (LoRA) weights
    and their optimizer state; only taken when skipping is enabled."""

    def __init__(self, params: list[torch.Tensor], optimizer):
        self.params = [p.detach().clone() for p in params]
        self.optimizer_state = copy.deepcopy(optimizer.state_dict())

    def restore(self, params: list[torch.Tensor], optimizer) -> None:
        with torch.no_grad():
            for p, saved in zip(params, self.params):
                p.copy_(saved)
        optimizer.load_state_dict(self.optimizer_state)


class TrainingWatch:
    """Warns (once each) when training visibly diverges: the loss rises tenfold over its first logged
    value, or the gradient norm is exactly 0 for `zero_grad_steps` steps in a row."""

    def __init__(self, zero_grad_steps: int = 3, rise: float = 10.0):
        self.zero_grad_steps, self.rise = zero_grad_steps, rise
        self.first_loss: float | None = None
        self.zero_run = 0
        self.warned: set[str] = set()

    def update(self, step: int, loss: float, grad_norm: float | None) -> list[str]:
        said = []
        if loss == loss and abs(loss) != float("inf"):  # skipped steps (nan) say nothing about divergence
            if self.first_loss is None:
                self.first_loss = loss
            elif self.first_loss > 0 and loss > self.rise * self.first_loss and "loss" not in self.warned:
                said.append(
                    f"loss rose from {self.first_loss:.4g} to {loss:.4g} by step {step} (over "
                    f"{self.rise:g}x): training is diverging; lower optimizer.lr"
                )
                self.warned.add("loss")
        if grad_norm is not None:
            self.zero_run = self.zero_run + 1 if grad_norm == 0 else 0
            if self.zero_run >= self.zero_grad_steps and "grad" not in self.warned:
                said.append(
                    f"gradient norm has been 0 for {self.zero_run} steps (to step {step}): nothing is "
                    f"being learned (saturated loss or a too-large optimizer.lr)"
                )
                self.warned.add("grad")
        for msg in said:
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
        return said
