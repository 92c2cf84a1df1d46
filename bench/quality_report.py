"""Rendering of the quality benchmark: the table (Markdown + CSV), the perplexity-vs-sparsity plot,
and per run the per-layer sparsity it chose (table + tile maps).  Pure functions of the row
records ``bench.quality`` saves, so a partial run renders too (unfinished rows: pending)."""
from __future__ import annotations

import csv
import math
import os
from typing import Optional

COLUMNS = ["method", "sparsity", "ppl", "ppl_compiled", "ppl_eager", "rel_diff", "steps", "tokens_seen",
           "calib_tokens", "wall_s", "eval_s", "device", "prior", "weights_updated", "loss", "hybrid_sites",
           "ppl_gpl3", "ppl_britannica", "code", "calibration", "load", "pred_decode_speedup",
           "pred_decode_speedup_l40s"]
OOD = ("ppl_gpl3", "ppl_britannica")          # out-of-domain texts
# the Markdown table: (header, key); "×" columns are the ratio to the dense row on the same text
MD = [("method", "method"), ("sparsity", "sparsity"), ("calibration", "calibration"), ("plays", "ppl"),
      ("×", "x:ppl"), ("GPL-3", "ppl_gpl3"), ("×", "x:ppl_gpl3"), ("Britannica", "ppl_britannica"),
      ("×", "x:ppl_britannica"), ("OOD mean ×", "ood"), ("rel_diff", "rel_diff"), ("steps", "steps"),
      ("lr", "lr"), ("prior gap", "prior_gap"), ("tokens_seen", "tokens_seen"), ("wall_s", "wall_s"),
      ("eval_s", "eval_s"), ("load", "load"),
      ("weights", "weights_updated"), ("decode× H200", "pred_decode_speedup"),
      ("decode× L40S", "pred_decode_speedup_l40s"), ("hybrid_sites", "hybrid_sites"), ("code", "code")]
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
        if key == "load" or key.startswith("pred_"):
            return f"{v:.2f}"
        return f"{v:.3f}"
    return str(v)


def write_csv(path: str, rows: list[dict]) -> str:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS + ["status"], extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS + ["status"]})
    return path


def ratios(r: dict, dense: Optional[dict]) -> dict:
    """``{key: ppl / dense ppl}`` per evaluation text, and ``ood``: their mean over the out-of-domain texts."""
    out = {}
    for k in ("ppl",) + OOD:
        if dense and r.get(k) and dense.get(k):
            out[k] = r[k] / dense[k]
    if all(k in out for k in OOD):
        out["ood"] = sum(out[k] for k in OOD) / len(OOD)
    return out


def learned_mode(method: str) -> Optional[str]:
    """The learning mode of a learned row's method name: "tile" (patch-tile rows), "joint" (patch-joint
    rows, learned 2:4), None for rows that learn nothing (one-shot, ``+ recon``)."""
    if method == "learned 2:4":
        return "joint"
    if method.endswith(" + recon"):
        return None
    head = method.split(" ")[0]
    return {"patch-tile": "tile", "patch-joint": "joint"}.get(head)


def learned_pair(r: dict, tile_key: str, pattern_key: str) -> str:
    """A learned row's option for the tile logits / the 2:4 pattern logits ("0.005 / 0.0005"); the tile
    value alone for tile mode (no 2:4 logits); "" for rows that learn nothing.  A pattern option of
    None falls back to the tile one (``prior_strength_24``; rows older than that option lack it)."""
    o = r.get("options") or {}
    if not r.get("steps") or o.get(tile_key) is None:
        return ""
    a = o[tile_key]
    if learned_mode(r.get("method", "")) == "tile":
        return f"{a:g}"
    b = o.get(pattern_key)
    return f"{a:g} / {a if b is None else b:g}"


def weights_cell(r: dict) -> str:
    """The ``weights`` cell: "updated" for rows that compute with updated weights; a ``+ recon`` row
    adds the fraction of each layer's update it took (``recon_strength``; rows older than that option
    took all of it) and the linears it reconstructed where not all (``recon_layers``)."""
    if not r.get("weights_updated"):
        return ""
    if not r.get("method", "").endswith(" + recon"):
        return "updated"
    o = r.get("options") or {}
    layers = o.get("recon_layers")
    return f"updated ×{o.get('recon_strength', 1.0):g}" + (f" (`{layers}`)" if layers else "")


def write_md(path: str, rows: list[dict], header: dict, link_dir: str = "quality") -> str:
    dense = next((r for r in rows if r["method"] == "dense" and r.get("status") == "done"), None)
    lines = [f"# {header.get('title', 'Quality benchmark')}", ""]
    for k, v in header.items():
        if k != "title":
            lines.append(f"- **{k}**: {v}")
    lines += ["", "| " + " | ".join(h for h, _ in MD) + " |", "|" + "---|" * len(MD)]
    for r in rows:
        if r.get("status") != "done":
            continue                    # rows not run with this code are listed in the notes, not here
        x = ratios(r, dense)
        cells = []
        for _, key in MD:
            if key.startswith("x:") or key == "ood":
                v = x.get(key[2:] if key.startswith("x:") else key)
                cells.append("" if v is None else f"{v:.2f}")
            elif key == "weights_updated":
                cells.append(weights_cell(r))
            elif key == "lr":                   # learned rows: the tile logits' Adam lr / the 2:4 logits'
                cells.append(learned_pair(r, "lr", "lr_24"))
            elif key == "prior_gap":            # learned rows: the prior's step-0 gap, tile logits / 2:4 logits
                cells.append(learned_pair(r, "prior_strength", "prior_strength_24"))
            else:
                cells.append(_fmt(r.get(key), key))
        lines.append("| " + " | ".join(cells) + " |")
    pending = [r["method"] for r in rows if r.get("status") != "done"]
    if pending:
        lines += ["", f"Not run with this code (see the notes): {', '.join(pending)}."]
    lines += ["", "Perplexities are of the compiled model (`torch.compile(backend=\"patch\")`) on each held-out text;"
              " `×` = over dense on the same text; `OOD mean ×` = the mean of the GPL-3 and Britannica ratios."
              "  `rel_diff` = the largest |compiled − eager| / eager over the three texts, eager being the"
              " masked eager model (`patchc.apply_plan` on a copy; must be ≤ 1e-4).  `calibration`: one dense"
              " pass of the calibration data or sequential (each block on the outputs of the pruned blocks before"
              " it); the one-shot 2:4 rows take the stronger of the two on the in-domain text.  `tokens_seen` ="
              " tokens the mask learning ran on (steps × batch × seq_len); `lr` = the Adam learning rates of the"
              " tile logits / the 2:4 pattern logits (tile rows have no 2:4 logits); `prior gap` = the prior's"
              " logit gap at step 0 in Gumbel noise units, the same two (blank: a row from before the bench"
              " set it, LearnConfig's default 3 for both).  `load` = mean 1-minute load average"
              " of the 2-core machine during the row.  `weights`: the row computes with updated weights (SparseGPT,"
              " reconstruction); for `+ recon` rows `×F` is the fraction of each layer's least-squares update taken"
              " (`--recon-strength`; ×1 the full update).  `decode×` = the cost model's predicted decode (M = 1, bf16) speedup of the"
              " planned linears, on the H200 and on the L40S.  `hybrid_sites` = linears the backend rewrote to"
              " the patchc op.  `code` = the patchc version and commit the row ran on."]
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


IN_DOMAIN = {25: 1.10, 35: 1.18, 45: 1.25}      # PATCH × dense in domain
OUT_OF_DOMAIN = {25: 1.25, 45: 1.6}             # PATCH × dense, mean of the out-of-domain texts


def _status(ok: Optional[bool]) -> str:
    return "pending" if ok is None else ("met" if ok else "missed")


def target_lines(rows: list[dict]) -> list[str]:
    """The targets, checked on the finished rows (PATCH = the better of tile / joint, mask only)."""
    done = {r["method"]: r for r in rows if r.get("status") == "done" and r.get("ppl")}
    dense = done.get("dense")
    x = {m: ratios(r, dense) for m, r in done.items()}

    def patch(s, key="ppl"):            # the better of tile / joint on ``key`` (a ratio: "ppl" or "ood")
        got = [m for m in (f"patch-tile {s}%", f"patch-joint {s}%") if m in x and key in x[m]]
        return min(got, key=lambda m: x[m][key]) if got else None

    out = ["## Targets", "", "| target | measured | status |", "|---|---|---|"]
    for s, lim in IN_DOMAIN.items():
        m = patch(s)
        v = x[m]["ppl"] if m else None
        out.append(f"| PATCH {s} % ≤ {lim:.2f}× dense in domain | {'pending' if m is None else f'{v:.3f}× ({m})'} | "
                   f"{_status(None if m is None else v <= lim)} |")
    for s, lim in OUT_OF_DOMAIN.items():
        m = patch(s, "ood")
        v = x[m].get("ood") if m else None
        out.append(f"| PATCH {s} % ≤ {lim:.2f}× dense out of domain (mean GPL-3, Britannica) | "
                   f"{'pending' if v is None else f'{v:.3f}× ({m})'} | {_status(None if v is None else v <= lim)} |")
    sg = done.get("sparsegpt 2:4")
    for m in [f"patch-{mode} {s}%" for s in (25, 35, 45) for mode in ("tile", "joint")]:
        if m in done and sg:
            worse = [k for k in ("ppl",) + OOD if done[m].get(k) is not None and sg.get(k) is not None
                     and done[m][k] >= sg[k]]
            vals = " / ".join(f"{done[m].get(k, float('nan')):.2f} vs {sg.get(k, float('nan')):.2f}"
                              for k in ("ppl",) + OOD)
            out.append(f"| {m} better than sparsegpt 2:4 (weights updated) on every text | {vals} | "
                       f"{_status(not worse)} |")
    l24 = x.get("learned 2:4", {}).get("ppl")
    out.append(f"| learned 2:4 ≤ 1.35× dense in domain | {'pending' if l24 is None else f'{l24:.3f}×'} | "
               f"{_status(None if l24 is None else l24 <= 1.35)} |")
    for m, r in done.items():
        if m.endswith(" + recon") and m[: -len(" + recon")] in done:
            base = done[m[: -len(" + recon")]]
            keys = [k for k in ("ppl",) + OOD if r.get(k) is not None and base.get(k) is not None]
            vals = " / ".join(f"{r[k]:.2f} vs {base[k]:.2f}" for k in keys)
            out.append(f"| {m} < mask only on every text | {vals} | {_status(all(r[k] < base[k] for k in keys))} |")
    for m, r in done.items():
        if m.endswith(" latency-aware") and m[: -len(" latency-aware")] in done:
            base = done[m[: -len(" latency-aware")]]
            keys = [k for k in ("ppl",) + OOD if r.get(k) is not None and base.get(k) is not None]
            # perplexities compare only between plans learned as long (a lost speedup is lost either way)
            if r.get("steps") == base.get("steps"):
                vals, same = " / ".join(f"{r[k]:.2f} vs {base[k]:.2f}" for k in keys), all(r[k] <= base[k] for k in keys)
            else:
                vals, same = f"learned {r.get('steps')} vs {base.get('steps')} steps: perplexities not compared", None
            for dev, key in (("H200", "pred_decode_speedup"), ("L40S", "pred_decode_speedup_l40s")):
                a, b = r.get(key), base.get(key)
                if a is None or b is None:
                    continue
                ok = False if a <= b else same
                out.append(f"| {m}: ppl ≤ by count on every text, higher predicted decode speedup ({dev}) | "
                           f"{vals}; {a:.3f}× vs {b:.3f}× | {_status(ok)} |")
    bad = [m for m, r in done.items() if r.get("rel_diff") is not None and r["rel_diff"] > 1e-4]
    n = sum(r.get("rel_diff") is not None for r in done.values())
    out.append(f"| compiled = masked eager (≤ 1e-4) on every row and text | "
               f"{'all ' + str(n) + ' sparse rows' if not bad else ', '.join(bad)} | {_status(None if not n else not bad)} |")
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
        m = r["method"]
        if m.split(" ")[0] in ("oneshot-hybrid", "patch-tile", "patch-joint"):
            parts = m.split(" ")
            fam = " ".join([parts[0]] + parts[2:])       # "patch-joint 35% + recon" -> "patch-joint + recon"
        else:
            fam = m
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
    ax.set_ylabel("perplexity (in-domain plays, log scale)")
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
