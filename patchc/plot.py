"""The whole-model tile map of a plan as one picture (matplotlib, headless).

One row per decoder block, one column per kind of layer (``self_attn.q_proj``...), each layer's
tile grid drawn at its true proportions: 2:4 tiles dark, dense tiles light.  Layers outside the
blocks (an LM head, say) share a last row."""
from __future__ import annotations

import numpy as np

from .summary import blocks

_GAP = 1          # tiles of blank between layers


def tile_canvas(plan):
    """(canvas, rows, kinds, x0, y0): a float array (NaN = blank, 0 dense, 1 2:4) with every
    layer's tile map placed at its block's row and its kind's column, and the offsets."""
    rows, kinds, where = blocks(plan)
    h = {r: 0 for r in rows}
    w = {k: 0 for k in kinds}
    for name, m in plan.items():
        r, k = where[name]
        h[r], w[k] = max(h[r], m.grid[0]), max(w[k], m.grid[1])
    x0, x = {}, 0
    for k in kinds:
        x0[k], x = x, x + w[k] + _GAP
    y0, y = {}, 0
    for r in rows:
        y0[r], y = y, y + h[r] + _GAP
    canvas = np.full((max(1, y - _GAP), max(1, x - _GAP)), np.nan)
    for name, m in plan.items():
        r, k = where[name]
        g = m.tile_kind.numpy().astype(float)
        canvas[y0[r]: y0[r] + g.shape[0], x0[k]: x0[k] + g.shape[1]] = g
    return canvas, rows, kinds, x0, y0, w, h


def plot_tile_maps(plan, path: str, title: str | None = None, max_layers: int | None = None) -> str:
    """Write the whole-model tile map of ``plan`` to ``path`` (PNG, SVG, PDF by extension);
    ``max_layers`` draws only the first ones."""
    if max_layers is not None and max_layers < len(plan):
        from .plan import MaskPlan
        plan = MaskPlan({n: plan[n] for n in list(plan)[:max_layers]}, plan.meta)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    canvas, rows, kinds, x0, y0, w, h = tile_canvas(plan)
    # a readable page whatever the model: ~0.3 in per block row, 10 in wide; tiles are stretched
    # (aspect "auto") rather than drawn as a 30:1 strip
    fig_w = 10.0
    fig_h = min(40.0, max(3.0, 0.3 * len(rows) + 1.8))
    fig, ax = plt.subplots(figsize=(fig_w, fig_h))
    cmap = ListedColormap(["#dfe7f2", "#1f3b73"]).with_extremes(bad="white")
    ax.imshow(np.ma.masked_invalid(canvas), cmap=cmap, vmin=0, vmax=1, interpolation="nearest", aspect="auto")
    ax.set_xticks([x0[k] + (w[k] - 1) / 2 for k in kinds])
    ax.set_xticklabels([k.split(".")[-1] for k in kinds], fontsize=8)
    ax.xaxis.tick_top()
    step = max(1, len(rows) // 40)                                    # at most ~40 row labels
    shown = [r for i, r in enumerate(rows) if i % step == 0 or r[1] < 0]
    ax.set_yticks([y0[r] + (h[r] - 1) / 2 for r in shown])
    ax.set_yticklabels([f"block {r[1]}" if r[1] >= 0 else "other" for r in shown], fontsize=7)
    ax.tick_params(length=0)
    for s in ax.spines.values():
        s.set_visible(False)
    sparse = sum(m.num_sparse_tiles() for m in plan.values())
    total = sum(m.tile_kind.numel() for m in plan.values())
    head = f"{title}: " if title else ""
    ax.set_title(f"{head}{len(plan)} layers, sparsity {plan.sparsity():.3f}, 2:4 tiles {sparse}/{total}\n"
                 "dark = 2:4 tile, light = dense tile", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
