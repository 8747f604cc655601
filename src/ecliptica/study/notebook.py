"""Small helpers the notebooks call, so notebooks stay three cells and hold no logic of their own."""
from __future__ import annotations

from pathlib import Path

from ..runio import read_jsonl_tolerant
from .runner import StudyRunner, load_study


def open_study(study: str, study_dir: str | None = None, overrides: list[str] | None = None) -> StudyRunner:
    overrides = list(overrides or [])
    if study_dir:
        overrides.append(f"study_dir={study_dir}")
    return StudyRunner(load_study(study, overrides))


def training_curves(runner: StudyRunner, arm: str, keys=("loss", "rewards/margins", "kl")):
    """Plot one arm's logged curves (every seed); returns the matplotlib figure."""
    import matplotlib.pyplot as plt

    spec = next(a for a in runner.cfg.arms if a.name == arm)
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
    spec = next(a for a in runner.cfg.arms if a.name == arm)
    for seed in runner.cfg.seeds:
        row = runner.store.get(runner.run_id(spec, seed))
        s = row["train_summary"] or {}
        fm = s.get("final_metrics", {})
        lines.append(f"| {seed} | {s.get('steps', '-')} | {s.get('train_seconds', 0) / 60:.1f} | "
                     f"{s.get('tokens_per_s', 0):.0f} | {fm.get('loss', float('nan')):.4f} | "
                     f"{fm.get('rewards/margins', float('nan')):.4f} |")
    return "\n".join(lines)


def results(runner: StudyRunner) -> tuple[str, list[Path]]:
    """The study's table (markdown) and the figure files, for display."""
    figures = sorted((runner.dir / "figures").glob("*.png"))
    return (runner.dir / "results.md").read_text(), figures
