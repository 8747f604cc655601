"""What the notebooks in comparative_study/ call, so that a notebook is a config cell plus calls and
everything it shows is reachable from a test (tests/study/test_notebook.py).

The six arm notebooks share one body and differ only in `ARM`; `07_evaluation` uses `missing_arms`
and `evaluate`, which never train an arm unless asked to.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import yaml

from ..config import TrainConfig
from ..runio import read_jsonl_tolerant
from ..train.summary import TrainSummary
from .config import ArmSpec
from .runner import StudyRunner, load_study

# where the prompt ends and the completion (the tokens the loss is computed on) begins
COMPLETION_MARK = "⟦completion⟧"


def open_study(study: str, study_dir: str | None = None, overrides: list[str] | None = None) -> StudyRunner:
    overrides = list(overrides or [])
    if study_dir:
        overrides.append(f"study_dir={study_dir}")
    return StudyRunner(load_study(study, overrides))


def _arm(runner: StudyRunner, arm: str) -> ArmSpec:
    spec = next((a for a in runner.cfg.arms if a.name == arm), None)
    if spec is None:
        raise ValueError(f"no arm {arm!r} in this study; arms: {[a.name for a in runner.cfg.arms]}")
    if not spec.trained:
        raise ValueError(f"arm {arm!r} ({spec.method}) is not trained; it has no training config")
    return spec


def arm_config(runner: StudyRunner, arm: str, seed: int | None = None) -> TrainConfig:
    """The arm's resolved TrainConfig for `seed` (default: the study's first); seeds differ only in
    `seed`, `run_dir` and `run_name`."""
    return runner.cfg.arm_config(_arm(runner, arm), runner.cfg.seeds[0] if seed is None else seed)


def config_yaml(runner: StudyRunner, arm: str) -> str:
    """The resolved config as YAML, as the trainer saves it next to the run (`config.yaml`)."""
    return yaml.safe_dump(arm_config(runner, arm).model_dump(mode="json"), sort_keys=False)


def training_example(runner: StudyRunner, arm: str) -> str:
    """The first pair of the arm's training split exactly as the model sees it: the data layer's own
    loading, chat template, instruction placement, truncation and tokenisation (the trainer's
    `prepare_data`), decoded with special tokens, with `COMPLETION_MARK` where the completion begins."""
    from ..losses import get_method
    from ..models import load_tokenizer
    from ..train.engine import prepare_data

    tc = arm_config(runner, arm)
    method = get_method(tc.method.name)
    placement = tc.method.placement or method.default_placement
    tok = load_tokenizer(tc.model)
    pair = prepare_data(tc, tok, placement, progress=False)[0].pairs[0]
    prompt = tok.decode(list(pair.prompt_ids))
    responses = [(name, getattr(pair, f"{name}_ids")) for name in method.layout.pair_responses]
    lines = [
        f"arm {arm}: method {method.name}, instruction placement {placement!r}, row {pair.row_id} "
        f"(first pair of the training split); the loss sees only the tokens after {COMPLETION_MARK}",
        f"tokens: prompt {len(pair.prompt_ids)}, " + ", ".join(f"{name} {len(ids)}" for name, ids in responses),
    ]
    for name, ids in responses:
        lines += [f"----- prompt + {name}", prompt + COMPLETION_MARK + tok.decode(list(ids))]
    return "\n".join(lines)


def training_curves(runner: StudyRunner, arm: str, keys=("loss", "rewards/margins", "kl")):
    """Plot one arm's logged curves (every seed) from metrics.jsonl; returns the matplotlib figure."""
    import matplotlib.pyplot as plt

    spec = _arm(runner, arm)
    present = []
    series = {}
    for seed in runner.cfg.seeds:
        path = Path(runner.cfg.arm_config(spec, seed).run_dir) / "metrics.jsonl"
        rows = read_jsonl_tolerant(path) if path.exists() else []
        series[seed] = rows
        present += [k for k in keys if rows and k in rows[-1] and k not in present]
    fig, axes = plt.subplots(1, max(len(present), 1), figsize=(4 * max(len(present), 1), 3), squeeze=False)
    for ax, key in zip(axes[0], present):
        for seed, rows in series.items():
            ax.plot([r["step"] for r in rows if key in r], [r[key] for r in rows if key in r], label=f"seed {seed}")
        ax.set_title(f"{arm}: {key}")
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    return fig


def summary_table(runner: StudyRunner, arm: str) -> str:
    lines = ["| seed | steps | minutes | tokens/s | final loss | final margin |", "|---|---|---|---|---|---|"]
    spec = _arm(runner, arm)
    for seed in runner.cfg.seeds:
        row = runner.store.get(runner.run_id(spec, seed))
        if not row["train_summary"]:  # not trained yet
            lines.append(f"| {seed} | - | - | - | - | - |")
            continue
        s = TrainSummary.model_validate(row["train_summary"])
        fm = s.final_metrics
        lines.append(
            f"| {seed} | {s.steps} | {s.train_seconds / 60:.1f} | {s.tokens_per_s:.0f} | "
            f"{fm.get('loss', float('nan')):.4f} | {fm.get('rewards/margins', float('nan')):.4f} |"
        )
    return "\n".join(lines)


def tensorboard_dir(runner: StudyRunner) -> Path:
    """Every run's training scalars and `eval/` scalars, one subdirectory per run."""
    return runner.dir / "tensorboard"


def inline_tensorboard() -> bool:
    """True in a kernel a Jupyter server started (JupyterLab, Notebook: it sets JPY_SESSION_NAME).
    Headless runs (nbclient in `make test`, `jupyter execute`) get False, so `%tensorboard` does not
    start a server process nobody will look at and nobody stops.

    When True, `%tensorboard` is pointed at this environment's `tensorboard` program: `make lab` runs
    `.venv/bin/python -m jupyterlab`, which leaves .venv/bin off the kernel's PATH."""
    if not os.environ.get("JPY_SESSION_NAME"):
        return False
    program = Path(sys.executable).with_name("tensorboard")
    if program.exists():
        os.environ.setdefault("TENSORBOARD_BINARY", str(program))
    return True


# ------------------------------------------------------------------ 07_evaluation
def missing_arms(runner: StudyRunner) -> dict[str, list[int]]:
    """Trained arms with seeds not trained yet (pending, interrupted or failed): arm -> seeds."""
    missing: dict[str, list[int]] = {}
    for arm, seed in runner.plan:
        status = runner.store.get(runner.run_id(arm, seed))["status"]
        if arm.trained and status not in ("trained", "evaluated"):
            missing.setdefault(arm.name, []).append(seed)
    return missing


def train_command(runner: StudyRunner) -> str:
    """The shell command that trains (and evaluates) every missing run of this study: `ecliptica run` on
    the resolved study.yaml skips finished runs and resumes interrupted ones. It runs from this
    directory because run directories are recorded as written (a relative STUDY_DIR stays relative)."""
    return (
        f"cd {shlex.quote(str(Path.cwd()))} && {shlex.quote(sys.executable)} -m ecliptica.cli run "
        f"{shlex.quote(str(runner.dir / 'study.yaml'))}"
    )


def evaluate(runner: StudyRunner, train_missing: bool = False) -> dict:
    """Evaluate every fully trained arm and the baseline, then write the report. Missing arms are named,
    with how to train them; they are trained here only if `train_missing` is True. Returns the report."""
    missing = missing_arms(runner)
    if missing and train_missing:
        print(f"training the missing arms: {', '.join(missing)}", flush=True)
        runner.train_all(only=list(missing))
        missing = missing_arms(runner)  # train_all raises on a failure, so this is empty
    if missing:
        print(
            "Not trained yet, so not evaluated: "
            + ", ".join(f"{a} (seeds {', '.join(map(str, s))})" for a, s in missing.items())
            + ".\n"
            "To train them: set TRAIN_MISSING = True in the config cell and run this notebook again, run "
            "their arm notebooks, or run\n    " + train_command(runner) + "\n"
            "The report below covers only the arms that exist.",
            flush=True,
        )
    runner.evaluate_all(only=[a.name for a in runner.cfg.arms if a.name not in missing])
    return runner.report()


def results(runner: StudyRunner) -> tuple[str, list[Path]]:
    """The study's table (markdown) and the figure files, for display."""
    figures = sorted((runner.dir / "figures").glob("*.png"))
    return (runner.dir / "results.md").read_text(), figures
