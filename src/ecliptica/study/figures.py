"""Study figures (matplotlib, Agg): every figure is written as ``<stem>.png`` and ``<stem>.pdf``.

Functions take the report's plain rows / findings (no records, no statistics here): the numbers and
intervals drawn are exactly those in results.json. A figure with nothing to show still gets written,
with a note in place of the plot, so the set of files is always the same.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ecliptica.evaluation.figures import LABEL_COLOURS, pyplot

_SIG_COLOUR, _NS_COLOUR = "tab:blue", "tab:gray"  # significance, not direction


def _save_both(fig, plt, stem: Path) -> dict[str, str]:
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    paths = {"png": str(stem.with_suffix(".png")), "pdf": str(stem.with_suffix(".pdf"))}
    fig.savefig(paths["png"], dpi=150)
    fig.savefig(paths["pdf"])
    plt.close(fig)
    return paths


def _empty(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def _yerr(values, lows, highs) -> np.ndarray:
    """Asymmetric error bars; a missing bound draws no bar (basic intervals may not contain the value)."""
    v = np.asarray(values, dtype=float)
    lo = np.asarray([np.nan if x is None else x for x in lows], dtype=float)
    hi = np.asarray([np.nan if x is None else x for x in highs], dtype=float)
    err = np.vstack([v - lo, hi - v])
    return np.nan_to_num(np.clip(err, 0, None))


def _bars(ax, labels, values, lows, highs, colours=None) -> None:
    x = np.arange(len(labels))
    ax.bar(x, values, yerr=_yerr(values, lows, highs), capsize=4, color=colours)
    ax.set_xticks(x, labels, rotation=30, ha="right")


def aqi_by_arm(rows: Sequence[Mapping[str, Any]], stem: Path) -> dict[str, str]:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    shown = [r for r in rows if r["aqi"] is not None]
    if shown:
        _bars(
            ax,
            [r["arm"] for r in shown],
            [r["aqi"] for r in shown],
            [r["aqi_low"] for r in shown],
            [r["aqi_high"] for r in shown],
        )
        ax.set_ylabel("AQI")
        ax.set_title("AQI by arm (95% CI)")
    else:
        _empty(ax, "no AQI recorded")
    return _save_both(fig, plt, stem)


def _difference_bars(ax, items, ylabel: str, title: str, blue: str = "CI excludes 0") -> None:
    """Differences with CIs around a zero line; items are (label, estimate, low, high, significant)."""
    labels, values, lows, highs, significant = zip(*items)
    _bars(ax, labels, values, lows, highs, [_SIG_COLOUR if sig else _NS_COLOUR for sig in significant])
    ax.axhline(0, color="black", lw=0.8)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title} (blue: {blue})", fontsize=10)


def delta_aqi(rows: Sequence[Mapping[str, Any]], stem: Path) -> dict[str, str]:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    shown = [r for r in rows if r["delta_aqi"] is not None]
    if shown:
        _difference_bars(
            ax,
            [
                (r["arm"], r["delta_aqi"], r["delta_aqi_low"], r["delta_aqi_high"], r["delta_aqi_significant"])
                for r in shown
            ],
            "ΔAQI vs baseline",
            "ΔAQI vs baseline",
        )
    else:
        _empty(ax, "ΔAQI not available (no baseline or no embeddings)")
    return _save_both(fig, plt, stem)


def grit_effect(findings: Sequence[Mapping[str, Any]], stem: Path) -> dict[str, str]:
    """Per base method: AQI(X_grit) − AQI(X) with its CI (Q2's AQI findings)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    shown = [f for f in findings if f.get("answerable")]
    if shown:
        _difference_bars(
            ax,
            [(f["comparison"], f["estimate"], f["low"], f["high"], f["significant"]) for f in shown],
            "AQI with GRIT − without",
            "GRIT effect per method",
            "significant after Holm",
        )
    else:
        _empty(ax, "no base method has both arms")
    return _save_both(fig, plt, stem)


def method_pairs(rows: Sequence[Mapping[str, Any]], methods: Sequence[str], stem: Path) -> dict[str, str]:
    """Each base method without and with GRIT side by side: AQI and refusal rate on unsafe prompts."""
    plt = pyplot()
    by_arm = {r["arm"]: r for r in rows}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    x = np.arange(len(methods))
    width = 0.38
    for ax, key, label in ((axes[0], "aqi", "AQI"), (axes[1], "refusal_rate_unsafe", "refusal rate (unsafe)")):
        for offset, suffix, name in ((-width / 2, "", "without GRIT"), (width / 2, "_grit", "with GRIT")):
            rs = [by_arm.get(m + suffix) for m in methods]
            vals = [r[key] if r and r[key] is not None else np.nan for r in rs]
            lows = [r[f"{key}_low"] if r else None for r in rs]
            highs = [r[f"{key}_high"] if r else None for r in rs]
            ax.bar(x + offset, np.nan_to_num(vals), width, yerr=_yerr(vals, lows, highs), capsize=3, label=name)
        ax.set_xticks(x, [m.upper() for m in methods])
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle("Base methods with and without GRIT (95% CI; missing arms drawn empty)")
    return _save_both(fig, plt, stem)


def efficiency(rows: Sequence[Mapping[str, Any]], stem: Path) -> dict[str, str]:
    """AQI against training minutes and peak VRAM (arms without training or GPU data are left out)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    panels = ((axes[0], "train_minutes", "training minutes"), (axes[1], "peak_vram_gib", "peak VRAM (GiB)"))
    for ax, key, label in panels:
        shown = [r for r in rows if r[key] is not None and r["aqi"] is not None]
        if not shown:
            _empty(ax, f"no {label} recorded" + (" (CPU runs)" if key == "peak_vram_gib" else ""))
            continue
        aqi = [r["aqi"] for r in shown]
        yerr = _yerr(aqi, [r["aqi_low"] for r in shown], [r["aqi_high"] for r in shown])
        ax.errorbar([r[key] for r in shown], aqi, yerr=yerr, fmt="o", capsize=3)
        for r in shown:
            ax.annotate(r["arm"], (r[key], r["aqi"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel("AQI")
    fig.suptitle("Cost vs AQI (95% CI on AQI)")
    return _save_both(fig, plt, stem)


def clusters_3d(
    best: tuple[str, np.ndarray] | None,
    baseline: tuple[str, np.ndarray] | None,
    labels: Sequence[str] | None,
    stem: Path,
) -> dict[str, str]:
    """3-D PCA of two arms' embeddings, fitted jointly so both panels share the same axes."""
    plt = pyplot()
    panels = [p for p in (baseline, best) if p is not None]
    if not panels or labels is None:
        fig, ax = plt.subplots(figsize=(6, 4))
        _empty(ax, "no embeddings")
        return _save_both(fig, plt, stem)
    from sklearn.decomposition import PCA

    joint = np.vstack([X for _, X in panels]).astype(np.float64)
    dims = min(3, joint.shape[0], joint.shape[1])
    pca = PCA(n_components=dims).fit(joint)
    labels = np.asarray([str(v) for v in labels])
    projected = [np.zeros((X.shape[0], 3)) for _, X in panels]
    for Z, (_, X) in zip(projected, panels):
        Z[:, :dims] = pca.transform(np.asarray(X, dtype=np.float64))
    low, high = np.min([Z.min(0) for Z in projected], 0), np.max([Z.max(0) for Z in projected], 0)
    fig = plt.figure(figsize=(6 * len(panels), 5))
    for i, ((name, _), Z) in enumerate(zip(panels, projected), 1):
        ax = fig.add_subplot(1, len(panels), i, projection="3d")
        ax.set_xlim(low[0], high[0]), ax.set_ylim(low[1], high[1]), ax.set_zlim(low[2], high[2])  # same scale
        for label in sorted(set(labels.tolist())):
            mask = labels == label
            ax.scatter(Z[mask, 0], Z[mask, 1], Z[mask, 2], s=8, alpha=0.7, label=label, color=LABEL_COLOURS.get(label))
        ax.set_title(name)
        ax.set_xlabel("PC1")
        ax.set_ylabel("PC2")
        ax.set_zlabel("PC3")
        ax.legend()
    fig.suptitle("Prompt embeddings, PCA fitted on both arms jointly (visual only; AQI uses the full space)")
    return _save_both(fig, plt, stem)


def training_curves(curves: Sequence[Mapping[str, Any]], metrics: Sequence[str], stem: Path) -> dict[str, str]:
    """One panel per metric, all arms overlaid (one line per seed, one colour per arm)."""
    plt = pyplot()
    present = [m for m in metrics if any(m in s for c in curves for s in c["steps"])]
    fig, axes = plt.subplots(1, max(1, len(present)), figsize=(5 * max(1, len(present)), 4), squeeze=False)
    if not present:
        _empty(axes[0, 0], "no training metrics recorded")
        return _save_both(fig, plt, stem)
    colours = {arm: f"C{i % 10}" for i, arm in enumerate(dict.fromkeys(c["arm"] for c in curves))}
    for ax, metric in zip(axes[0], present):
        labelled = set()
        for c in curves:
            points = [(s["step"], s[metric]) for s in c["steps"] if metric in s and s[metric] is not None]
            if not points:
                continue  # this arm doesn't log this metric (e.g. kl for DPO)
            steps, values = zip(*points)
            ax.plot(
                steps,
                values,
                color=colours[c["arm"]],
                lw=1.2,
                alpha=0.85,
                label=None if c["arm"] in labelled else c["arm"],
            )
            labelled.add(c["arm"])
        ax.set_xlabel("step")
        ax.set_title(metric)
        ax.legend(fontsize=8)
    return _save_both(fig, plt, stem)


def calibration_sweep(rows: Sequence[Mapping[str, Any]], kl_bound: float, stem: Path) -> dict[str, str]:
    """Calibration: validation preference accuracy vs benign KL to the base, one panel per arm, each sweep
    point labelled by its lr (and damping) with its 95% Wilson interval over the validation pairs; the chosen
    point ringed, the KL bound dashed, 0.5 (chance) dotted. One accuracy axis for every panel, so a
    difference within noise does not fill a panel."""
    from ..evaluation.stats import wilson_interval

    plt = pyplot()
    scored = [r for r in rows if r["val_accuracy"] is not None and r["benign_kl"] is not None]
    arms = list(dict.fromkeys(r["arm"] for r in scored))
    cols = min(4, max(1, len(arms)))
    n_rows = max(1, -(-len(arms) // cols))
    fig, axes = plt.subplots(n_rows, cols, figsize=(3.4 * cols, 3.0 * n_rows), squeeze=False, sharey=True)
    for ax in axes.flat[len(arms) :]:
        ax.set_axis_off()
    if not arms:
        _empty(axes.flat[0], "no scored calibration points")
    for ax, arm in zip(axes.flat, arms):
        pts = [r for r in scored if r["arm"] == arm]
        ax.plot([r["benign_kl"] for r in pts], [r["val_accuracy"] for r in pts], "o", color="tab:blue")
        ax.axhline(0.5, color="gray", ls=":", lw=0.8)
        for r in pts:
            if n := r.get("n_val_pairs"):  # accuracy is a fraction of n pairs: the interval shows what can be resolved
                lo, hi = wilson_interval(round(r["val_accuracy"] * n), n)
                ax.plot([r["benign_kl"]] * 2, [lo, hi], color="tab:blue", lw=0.8, alpha=0.5)
            label = f"{r['lr']:g}" + (f"/d{r['damping']:g}" if r["damping"] is not None else "")
            ax.annotate(
                label, (r["benign_kl"], r["val_accuracy"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
            if r["chosen"]:
                ax.plot(r["benign_kl"], r["val_accuracy"], "o", ms=12, mfc="none", mec="tab:red", mew=1.5)
        ax.axvline(kl_bound, color="gray", ls="--", lw=0.8)
        ax.set_title(arm, fontsize=10)
        ax.set_xlabel("benign KL to base (per token)", fontsize=8)
        ax.set_ylabel("validation accuracy", fontsize=8)
    fig.suptitle(
        "Calibration sweep (label: lr[/damping]; bar: 95% Wilson interval; ring: chosen; dashed: KL bound; "
        "dotted: chance)",
        fontsize=10,
    )
    return _save_both(fig, plt, stem)
