"""Rendering of the quality benchmark: the table (Markdown + CSV), the perplexity-vs-sparsity plot,
and per run the per-layer sparsity it chose (table + tile maps).  Pure functions of the row
records ``bench.quality`` saves, so a partial run renders too (unfinished rows: pending)."""
from __future__ import annotations

import csv
import math
import os
from typing import Optional

COLUMNS = ["method", "sparsity", "ppl", "ppl_compiled", "ppl_eager", "rel_diff", "steps", "tokens_seen",
           "calib_tokens", "wall_s", "eval_s", "device", "prior", "weights_updated", "loss", "hybrid_sites"]
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _fmt(v, key: str) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if key in ("sparsity",):
            return f"{v:.4f}"
        if key == "rel_diff":
            return f"{v:.1e}"
        if key in ("wall_s", "eval_s"):
            return f"{v:.0f}"
        return f"{v:.3f}"
    return str(v)


def write_csv(path: str, rows: list[dict]) -> str:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS + ["status"], extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS + ["status"]})
    return path


def write_md(path: str, rows: list[dict], header: dict, link_dir: str = "quality") -> str:
    dense = next((r.get("ppl") for r in rows if r["method"] == "dense" and r.get("ppl")), None)
    cols = COLUMNS[:3] + ["× dense"] + COLUMNS[3:]
    lines = [f"# {header.get('title', 'Quality benchmark')}", ""]
    for k, v in header.items():
        if k != "title":
            lines.append(f"- **{k}**: {v}")
    lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if r.get("status") != "done":
            lines.append("| " + " | ".join([r["method"]] + ["pending"] + [""] * (len(cols) - 2)) + " |")
            continue
        cells = []
        for c in cols:
            if c == "× dense":
                cells.append(f"{r['ppl'] / dense:.2f}" if dense else "")
            else:
                cells.append(_fmt(r.get(c), c))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "`ppl` = perplexity of the compiled model (`torch.compile(backend=\"patch\")`); `ppl_eager` ="
              " the masked eager model (`patchc.apply_plan` on a copy); `rel_diff` = |compiled − eager| / eager"
              " (must be ≤ 1e-4).  `tokens_seen` = tokens the mask learning ran on (steps × batch × seq_len);"
              " `calib_tokens` = tokens of the calibration statistics (Wanda/SparseGPT/prior).  `hybrid_sites` ="
              " linears the backend rewrote to the patchc op (the rest stayed masked dense)."]
    lines += [""] + target_lines(rows)
    notes = os.path.join(os.path.dirname(path), link_dir, "NOTES.md")
    if os.path.isfile(notes):                       # hand-written analysis, kept across renders
        with open(notes) as f:
            lines += ["", f.read().strip()]
    layered = [r for r in rows if r.get("layer_files")]
    if layered:
        lines += ["", "Per-layer sparsity each run chose (table, tile maps, block × projection heatmap):", ""]
        for r in layered:
            files = r["layer_files"]
            lines.append(f"- {r['method']}: " + ", ".join(f"[{os.path.basename(f)}]({link_dir}/{f})" for f in files))
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def target_lines(rows: list[dict]) -> list[str]:
    """The issue's targets, checked on the finished rows (PATCH = the better of tile / joint)."""
    ppl = {r["method"]: r["ppl"] for r in rows if r.get("status") == "done" and r.get("ppl")}
    dense = ppl.get("dense")

    def patch(s):
        got = {m: ppl[m] for m in (f"patch-tile {s}%", f"patch-joint {s}%") if m in ppl}
        return (min(got.values()), min(got, key=got.get)) if got else (None, None)

    out = ["## Targets", "", "| target | measured | status |", "|---|---|---|"]
    p25, m25 = patch(25)
    ratio = p25 / dense if p25 and dense else None
    out.append(f"| PATCH 25 % ≤ 1.15× dense | {'pending' if ratio is None else f'{ratio:.2f}× ({m25})'} | "
               f"{'pending' if ratio is None else 'met' if ratio <= 1.15 else 'missed'} |")
    p45, m45 = patch(45)
    one24 = {m: ppl[m] for m in ("magnitude 2:4", "wanda 2:4", "sparsegpt 2:4") if m in ppl}
    if p45 and one24:
        best = min(one24, key=one24.get)
        r = one24[best] / p45
        out.append(f"| PATCH 45 % ≥ 2× better than the best one-shot 2:4 | {best} / {m45} = {r:.2f}× | "
                   f"{'met' if r >= 2 else 'missed'} |")
        masks_only = {m: v for m, v in one24.items() if m != "sparsegpt 2:4"}     # SparseGPT updates weights
        if best == "sparsegpt 2:4" and masks_only:
            b2 = min(masks_only, key=masks_only.get)
            r2 = masks_only[b2] / p45
            out.append(f"| (same, against the best one-shot 2:4 that keeps the weights) | {b2} / {m45} = "
                       f"{r2:.2f}× | {'met' if r2 >= 2 else 'missed'} |")
    else:
        out.append("| PATCH 45 % ≥ 2× better than the best one-shot 2:4 | pending | pending |")
    for s in (25, 35, 45):
        for kind in ("tile", "joint"):
            m, o = f"patch-{kind} {s}%", f"oneshot-hybrid {s}%"
            if m in ppl and o in ppl:
                out.append(f"| {m} < {o} | {ppl[m]:.2f} vs {ppl[o]:.2f} | {'met' if ppl[m] < ppl[o] else 'missed'} |")
    chain = [("PATCH 25%", patch(25)[0]), ("PATCH 35%", patch(35)[0]), ("PATCH 45%", patch(45)[0]),
             ("learned 2:4", ppl.get("learned 2:4")), ("sparsegpt 2:4", ppl.get("sparsegpt 2:4")),
             ("wanda 2:4", ppl.get("wanda 2:4")), ("magnitude 2:4", ppl.get("magnitude 2:4"))]
    have = [(n, v) for n, v in chain if v is not None]
    broken = [f"{a} {va:.1f} ≥ {b} {vb:.1f}" for (a, va), (b, vb) in zip(have, have[1:]) if va >= vb]
    status = "pending" if len(have) < len(chain) and not broken else ("met" if not broken else "missed")
    out.append(f"| ordering {' < '.join(n for n, _ in chain)} | "
               f"{' < '.join(f'{v:.1f}' for _, v in have) if not broken else '; '.join(broken)} | {status} |")
    return out


def plot_quality(path: str, rows: list[dict], title: str = "SmolLM2-135M perplexity vs sparsity") -> Optional[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r.get("status") == "done"]
    if not done:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    families: dict[str, list] = {}
    for r in done:
        fam = r["method"].rsplit(" ", 1)[0] if r["method"].split(" ")[0] in ("oneshot-hybrid", "patch-tile",
                                                                               "patch-joint") else r["method"]
        families.setdefault(fam, []).append((r["sparsity"], r["ppl"]))
    markers = iter("os^Dv<>phX*")
    for fam, pts in families.items():
        pts.sort()
        if fam == "dense":
            ax.axhline(pts[0][1], color="k", ls=":", lw=1, label=f"dense ({pts[0][1]:.2f})")
            continue
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker=next(markers), ls="-" if len(pts) > 1 else "none", label=fam)
    ax.set_yscale("log")
    ax.set_xlim(-0.02, 0.52)
    ax.set_xlabel("achieved sparsity of the planned linears")
    ax.set_ylabel("perplexity (eval texts, log scale)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _block_and_proj(name: str) -> tuple[Optional[int], str]:
    parts = name.split(".")
    idx = next((int(p) for p in parts if p.isdigit()), None)
    return idx, parts[-1]


def write_layer_report(plan, out_prefix: str, title: str) -> list[str]:
    """``<prefix>-layers.csv`` / ``.md`` (per-linear sparsity and 2:4 tiles), ``<prefix>-tiles.png``
    (every tile map) and ``<prefix>-heatmap.png`` (sparsity per block × projection)."""
    from patchc.plot import plot_tile_maps

    per = plan.per_layer()
    os.makedirs(os.path.dirname(out_prefix) or ".", exist_ok=True)
    with open(out_prefix + "-layers.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer", "shape", "tiles", "sparse_tiles", "frac_sparse_tiles", "sparsity"])
        for n, r in per.items():
            w.writerow([n, "x".join(map(str, r["shape"])), r["tiles"], r["sparse_tiles"],
                        f"{r['frac_sparse']:.4f}", f"{r['sparsity']:.4f}"])
    blocks: dict[int, dict[str, float]] = {}
    projs: list[str] = []
    for n, r in per.items():
        b, p = _block_and_proj(n)
        if p not in projs:
            projs.append(p)
        blocks.setdefault(-1 if b is None else b, {})[p] = r["sparsity"]
    lines = [f"# {title}", "", f"global sparsity {plan.sparsity():.4f}; per-linear sparsity (0 = dense, 0.5 = all"
             " tiles 2:4), one row per decoder block", "", "| block | " + " | ".join(projs) + " | mean |",
             "|---|" + "---|" * (len(projs) + 1)]
    for b in sorted(blocks):
        vals = [blocks[b].get(p) for p in projs]
        real = [v for v in vals if v is not None]
        lines.append(f"| {b} | " + " | ".join("" if v is None else f"{v:.3f}" for v in vals)
                     + f" | {sum(real) / max(1, len(real)):.3f} |")
    with open(out_prefix + "-layers.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    out = [out_prefix + "-layers.csv", out_prefix + "-layers.md"]
    out.append(plot_tile_maps(plan, out_prefix + "-tiles.png", max_layers=len(plan), title=title))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    grid = [[blocks[b].get(p, math.nan) for p in projs] for b in sorted(blocks)]
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(projs), 1.0 + 0.18 * len(grid)))
    im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=0.5, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(projs)), projs, rotation=45, fontsize=7)
    ax.set_yticks(range(len(grid)), [str(b) for b in sorted(blocks)], fontsize=6)
    ax.set_ylabel("decoder block")
    ax.set_title(title, fontsize=8)
    fig.colorbar(im, ax=ax, label="sparsity")
    fig.tight_layout()
    fig.savefig(out_prefix + "-heatmap.png", dpi=110)
    plt.close(fig)
    out.append(out_prefix + "-heatmap.png")
    return out
