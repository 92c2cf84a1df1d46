"""Tile-map heatmaps of a plan (matplotlib, headless)."""
from __future__ import annotations

import math


def plot_tile_maps(plan, path: str, max_layers: int = 64, title: str | None = None) -> str:
    """One panel per layer: 2:4 tiles dark, dense tiles light; the panel title gives its sparsity."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(plan)[:max_layers]
    cols = min(7, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.0 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        m = plan[name]
        ax.imshow(m.tile_kind.numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
        ax.set_title(f"{name}\n{m.sparsity():.2f}", fontsize=6)
    fig.suptitle(title or f"tile maps (dark = 2:4), global sparsity {plan.sparsity():.3f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
