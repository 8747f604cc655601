"""Frontier figures (one per outcome: arms as curves over benign KL with bands, KL levels marked) and the
convergence figure (validation metric against steps and GPU-seconds, each arm solid and its GRIT twin dashed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .convergence import grit_twins
from .frontier import Frontier


def frontier_figures(fr: Frontier, outcomes, levels, out: Path, n_grid: int = 25) -> list[Path]:
    """Per arm: the mean over seeds of the interpolated outcome on a log-KL grid inside every seed's range, a band
    from the draws (prompts and drift examples resampled; seeds averaged), and each point as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for outcome in outcomes:
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, arm in enumerate(fr.arms):
            if fr.lacking(outcome, arm):
                continue
            color = f"C{i % 10}"
            seeds = fr.seeds(arm)
            lo = max(min(fr.kl(p)[0] for p in fr.by_run[(arm, s)]) for s in seeds)
            hi = min(max(fr.kl(p)[0] for p in fr.by_run[(arm, s)]) for s in seeds)
            pts = [p for p in fr.points if p.arm == arm]
            ax.scatter(
                [fr.kl(p)[0] for p in pts], [fr.outcome(p, outcome)[0] for p in pts], s=8, color=color, alpha=0.4
            )
            if not (0 < lo < hi):
                continue
            grid = np.geomspace(lo, hi, n_grid)
            curves = [fr.seed_curve(arm, s, outcome, grid, "linear_log_kl") for s in seeds]
            mean = np.mean([c.estimate for c in curves], axis=0)
            draws = np.nanmean(np.stack([c.draws for c in curves]), axis=0)
            band = np.nanquantile(draws, [0.025, 0.975], axis=0)
            ax.plot(grid, mean, color=color, label=arm)
            ax.fill_between(grid, band[0], band[1], color=color, alpha=0.2)
        for level in levels:
            ax.axvline(level, color="grey", linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel("benign token KL to the base")
        ax.set_ylabel(outcome)
        ax.legend(fontsize=7)
        fig.tight_layout()
        for ext in ("png", "pdf"):
            path = out / f"frontier_{outcome}.{ext}"
            fig.savefig(path)
            written.append(path)
        plt.close(fig)
    return written


def convergence_figure(conv, s, out: Path) -> list[Path]:
    """Validation metric against steps (left) and GPU-seconds (right), mean over seeds per (arm, lr)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    arms = list(dict.fromkeys(a for a, _, _ in conv))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for i, (arm, twin) in enumerate(grit_twins(arms)):
        for name, style in ((arm, "-"), (twin, "--")):
            for (a, lr, seed), run in conv.items():
                if a != name or not run["curve"]:
                    continue
                steps = [c["step"] for c in run["curve"]]
                values = [c["value"] for c in run["curve"]]
                label = f"{name} lr {lr:g}" if seed == min(sd for x, y, sd in conv if x == a and y == lr) else None
                axes[0].plot(steps, values, style, color=f"C{i % 10}", alpha=0.6, label=label)
                compute = [c["compute"] for c in run["curve"]]
                if all(c is not None for c in compute):
                    axes[1].plot(compute, values, style, color=f"C{i % 10}", alpha=0.6)
    for ax, xlabel in zip(axes, ("step", "GPU-seconds")):
        ax.axhline(s.level, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel(xlabel)
    axes[0].set_ylabel(s.metric)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    written = []
    for ext in ("png", "pdf"):
        path = out / f"convergence.{ext}"
        fig.savefig(path)
        written.append(path)
    plt.close(fig)
    return written
