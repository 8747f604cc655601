"""The frontier's runs and checkpoints: which runs a frontier study adds, where each checkpoint's evaluation
goes, and the report section that reads them back.

Each trained arm `X` runs at its own learning rate (the study's shared lr, as without the frontier: the
secondary, single-point view of the results table) and at every other lr of `frontier.lrs` as an extra arm
`X-lr<lr>` of the same method, optimizer and placement. Every trained run keeps a checkpoint at each step of
`frontier.steps`; the final step is the run's ordinary evaluation (`eval/test/` or `eval/`), each earlier one
is evaluated on the `test` prompts into `eval/step-<N>/`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import ArmSpec, StudyConfig


def check_frontier(cfg: StudyConfig) -> None:
    """Settings the frontier needs, checked when the study loads."""
    s, ev = cfg.frontier, cfg.evaluation
    if cfg.calibration.enabled:
        raise ValueError("frontier and calibration are both enabled: the frontier sweeps frontier.lrs itself")
    if not ev.drift.enabled:
        raise ValueError("frontier needs evaluation.drift.enabled: true (benign KL to the base is its x-axis)")
    if "preference_accuracy" in s.outcomes and not ev.preference.enabled:
        raise ValueError("frontier.outcomes has preference_accuracy: set evaluation.preference.enabled: true")
    if {"refusal_rate_unsafe", "over_refusal_rate_safe"} & set(s.outcomes) and not ev.behaviour.enabled:
        raise ValueError("frontier.outcomes has refusal outcomes: set evaluation.behaviour.enabled: true")
    clash = {lr_name(a.name, lr) for a in cfg.arms for lr in s.lrs} & {a.name for a in cfg.arms}
    if clash:
        raise ValueError(f"arms {sorted(clash)} have the names of the frontier's own arms (<arm>-lr<lr>); rename them")


def lr_name(arm: str, lr: float) -> str:
    return f"{arm}-lr{lr:g}"


def frontier_runs(cfg: StudyConfig) -> list[tuple[str, float, ArmSpec]]:
    """(declared arm, lr, the arm that runs it) for every trained arm and lr; empty without the frontier."""
    if not cfg.frontier.enabled:
        return []
    out = []
    for arm in cfg.arms:
        if not arm.trained:
            continue
        own = cfg.arm_config(arm, cfg.seeds[0]).optimizer.lr
        out.append((arm.name, own, arm))
        for lr in cfg.frontier.lrs:
            if lr != own:
                extra = arm.model_copy(
                    update={"name": lr_name(arm.name, lr), "overrides": {**arm.overrides, "optimizer.lr": lr}}
                )
                out.append((arm.name, lr, extra))
    return out


def frontier_arms(cfg: StudyConfig) -> list[ArmSpec]:
    """The arms the frontier adds to the plan (each trained arm at its other learning rates)."""
    declared = {a.name for a in cfg.arms}
    return [spec for _, _, spec in frontier_runs(cfg) if spec.name not in declared]


def eval_dir(cfg: StudyConfig, run_dir: Path, step: int) -> Path:
    if step == cfg.frontier.max_steps:  # the run's ordinary evaluation
        return run_dir / "eval" / "test" if cfg.evaluation_sets else run_dir / "eval"
    return run_dir / "eval" / f"step-{step}"


def evaluate_checkpoints(
    runner, arm: ArmSpec, run_dir: Path, behaviour: dict | None, layer_weights: dict | None = None
) -> list[Path]:
    """Evaluate a trained run's earlier frontier checkpoints on the `test` prompts (skipping those done).
    `layer_weights`: the behaviour AQI's layer pooling fitted on the run's dev evaluation, so every checkpoint
    is scored with the pooling its final step's test score uses (None: fitted in-sample, and recorded so)."""
    from ..evaluation.runner import run_eval

    cfg = runner.cfg
    if not cfg.frontier.enabled or not arm.trained:
        return []
    done = []
    for step in sorted(cfg.frontier.steps):
        out = eval_dir(cfg, run_dir, step)
        if step == cfg.frontier.max_steps or (out / "eval.json").exists():
            continue
        adapter = run_dir / "checkpoints" / f"step-{step}" / "adapter"
        if not adapter.exists():
            raise FileNotFoundError(
                f"{adapter}: the frontier checkpoint at step {step} is missing (train.save_every "
                f"{cfg.frontier.save_every}, keep_checkpoints {cfg.frontier.keep_checkpoints})"
            )
        ecfg = cfg.eval_config(out, adapter, behaviour=behaviour, data=cfg.eval_sets()["test"])
        if layer_weights is not None:
            ecfg.behaviour_aqi.layer_weights = layer_weights
        print(f"[study] evaluating {run_dir.name} checkpoint step {step}", flush=True)
        run_eval(ecfg, handle=runner._handle, prompts=runner._prompts["test"])
        done.append(out)
    return done


def read_frontier(cfg: StudyConfig):
    """(points, convergence per run, names of checkpoints not evaluated yet) from the run directories."""
    from .convergence import run_convergence
    from .frontier_points import read_point

    points, conv, missing = [], {}, []
    for arm, lr, spec in frontier_runs(cfg):
        for seed in cfg.seeds:
            run_dir = Path(cfg.study_dir) / "runs" / cfg.run_id(spec, seed)
            if cfg.convergence.enabled:
                conv[(arm, lr, seed)] = run_convergence(run_dir / "metrics.jsonl", cfg.convergence)
            for step in cfg.frontier.steps:
                d = eval_dir(cfg, run_dir, step)
                if not (d / "eval.json").exists():
                    missing.append(f"{cfg.run_id(spec, seed)} step {step}")
                    continue
                points.append(read_point(d, arm=arm, seed=seed, lr=lr, step=step, s=cfg.frontier))
    return points, conv, missing


def frontier_sections(cfg: StudyConfig) -> list:
    """The report's matched-drift and convergence section (frontier.json/csv and figures too); none without it."""
    if not cfg.frontier.enabled:
        return []
    from .frontier_report import write_frontier_report

    lines = write_frontier_report(cfg, Path(cfg.study_dir))
    return [lambda by_arm: lines]
