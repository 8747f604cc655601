"""Figures (matplotlib, Agg backend: no display needed): PCA / t-SNE scatter and the layer curve.

The scatters are for looking only: AQI is computed on the hidden states (optionally PCA-reduced),
never on these projections (docs/aqi.md explains why not on t-SNE).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

LABEL_COLOURS = {"safe": "tab:blue", "unsafe": "tab:red"}


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colour_groups(labels: Sequence[str]):
    labels = np.asarray([str(v) for v in labels])
    for label in sorted(set(labels.tolist())):
        yield label, labels == label, LABEL_COLOURS.get(label)


def pca_scatter_3d(X: np.ndarray, labels: Sequence[str], path: str | Path, title: str = "") -> Path:
    from sklearn.decomposition import PCA

    plt = pyplot()
    dims = min(3, X.shape[0], X.shape[1])
    pca = PCA(n_components=dims).fit(X)
    Z = np.zeros((X.shape[0], 3))
    Z[:, :dims] = pca.transform(X)
    fig = plt.figure(figsize=(6, 5))
    ax = fig.add_subplot(projection="3d")
    for label, mask, colour in _colour_groups(labels):
        ax.scatter(Z[mask, 0], Z[mask, 1], Z[mask, 2], s=10, alpha=0.7, label=label, color=colour)
    var = pca.explained_variance_ratio_
    ax.set_xlabel(f"PC1 ({var[0]:.0%})")
    ax.set_ylabel(f"PC2 ({var[1]:.0%})" if dims > 1 else "PC2")
    ax.set_zlabel(f"PC3 ({var[2]:.0%})" if dims > 2 else "PC3")
    ax.set_title(title or "prompt embeddings, first 3 principal components")
    ax.legend()
    return _save(fig, plt, path)


def tsne_scatter(X: np.ndarray, labels: Sequence[str], path: str | Path, seed: int = 0, title: str = "") -> Path:
    from sklearn.manifold import TSNE

    plt = pyplot()
    perplexity = float(min(30, max(2, (X.shape[0] - 1) // 3)))
    Z = TSNE(n_components=2, perplexity=perplexity, random_state=seed, init="pca").fit_transform(X)
    fig, ax = plt.subplots(figsize=(6, 5))
    for label, mask, colour in _colour_groups(labels):
        ax.scatter(Z[mask, 0], Z[mask, 1], s=10, alpha=0.7, label=label, color=colour)
    ax.set_title(title or "prompt embeddings, t-SNE (visual only; not used for AQI)")
    ax.legend()
    return _save(fig, plt, path)


def layer_curve_plot(per_layer: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Discriminant AQI (with its interval) and geometric AQI per layer (`aqi_layers.per_layer` of eval.json)."""
    plt = pyplot()
    layers = [c["layer"] for c in per_layer]
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind in ("discriminant", "geometric"):
        ax.plot(layers, [c[kind]["aqi"] for c in per_layer], marker="o", ms=3, label=f"{kind} AQI")
        if "low" in per_layer[0][kind]:  # per-layer intervals: discriminant only
            ax.fill_between(
                layers, [c[kind]["low"] for c in per_layer], [c[kind]["high"] for c in per_layer], alpha=0.2
            )
    ax.set_xlabel("hidden-state index (0 = token embeddings)")
    ax.set_ylabel("AQI (shaded: interval)")
    ax.set_title(title or "AQI by layer")
    ax.legend()
    return _save(fig, plt, path)


def _save(fig, plt, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
