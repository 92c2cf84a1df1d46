"""The demo's one-screen summary (and, with ``--full``, its per-layer table), each line <= 100
columns."""
from __future__ import annotations

import os
import textwrap

import torch

from .summary import format_table, kind_rows


def _describe(res) -> str:
    plan = res["plan"]
    meta = plan.meta
    if res["plan_source"] is None:
        return f"one-shot Wanda hybrid at {res['sparsity']:.1%} (--sparsity)"
    src = os.path.basename(res["plan_source"])
    how = meta.get("method", "?")
    if meta.get("prior"):
        how += f", {meta['prior']} prior"
    steps = (meta.get("config") or {}).get("steps") if isinstance(meta.get("config"), dict) else meta.get("steps")
    if steps:
        how += f", {steps} steps"
    return f"{src} ({how})"


def _short(path: str, room: int = 76) -> str:
    """``path`` in at most ``room`` characters: relative when that is shorter, else its tail."""
    rel = os.path.relpath(path)
    path = rel if len(rel) < len(path) else path
    return path if len(path) <= room else "…" + path[-(room - 1):]


def _label(res) -> str:
    method = str(res["plan"].meta.get("method", "plan"))
    if method.startswith("patch-"):
        return "PATCH, learned plan"
    return f"plan: {method}"[:23]


def summary_lines(res, *, text, n_eval, seq_len, tokens, prompt, out_dir, inner, full, quiet) -> list[str]:
    from .cliutil import packed_bytes_table
    plan = res["plan"]
    d, s, o = res["ppl_dense"], res["ppl_sparse"], res["ppl_oneshot"]
    if quiet:
        return [f"perplexity dense {d:.2f}, PATCH {s:.2f} ({s / d:.2f}x), one-shot {res['oneshot_method']} "
                f"{o:.2f} ({o / d:.2f}x) at sparsity {res['sparsity']:.4f}; {res['op_calls']} patchc op calls"]
    tiles = sum(m.tile_kind.numel() for m in plan.values())
    sparse = sum(m.num_sparse_tiles() for m in plan.values())
    weights = sum(m.shape[0] * m.shape[1] for m in plan.values())
    in24 = sum(m.fraction_sparse_tiles() * m.shape[0] * m.shape[1] for m in plan.values())
    packed, dense = packed_bytes_table(plan, torch.bfloat16)
    lines = [
        f"patchc demo: {res.get('model', 'SmolLM2-135M')} (fp32, CPU) with tile-level hybrid dense / 2:4 sparsity",
        "",
        f"plan        {_describe(res)}",
        f"            {len(plan)} linears, {res['sparsity']:.2%} sparse: {sparse} 2:4 + {tiles - sparse} dense "
        f"tiles ({in24 / max(1, weights):.0%} of weights in 2:4)",
        f"bytes       bf16 weights of those linears {dense / 2**20:.1f} MiB dense -> {packed / 2**20:.1f} MiB packed "
        f"({packed / dense - 1:+.1%})",
    ]
    lines += format_table(kind_rows(plan), indent="            ")
    lines += [
        f"compiled    patchc.compile(model, plan, inner={inner!r}): {res['hybrid_sites']}/{res['sites']} linear "
        f"sites rewritten,",
        f"            {res['op_calls']} patchc op calls (compile + first pass {res['compile_and_first_pass_s']:.0f} s)",
        "",
        f"perplexity  {text}, {n_eval} x {seq_len} tokens (never used for learning)",
        f"  dense                           {d:8.2f}",
        f"  {_label(res):<24}{res['sparsity']:6.1%}  {s:8.2f}   {s / d:.2f}x dense",
        f"  one-shot {res['oneshot_method']:<14} {res['sparsity']:6.1%}  {o:8.2f}   {o / d:.2f}x dense",
        "",
        f"greedy text, {tokens} tokens after \"{prompt}\"",
        "  dense" + " " * 42 + ("PATCH" if _label(res).startswith("PATCH") else "sparse") + " (compiled)",
    ]
    lines += side_by_side(res["text_dense"], res["text_sparse"])
    kdir = os.path.join(out_dir, "cache", "kernels")
    lines += [
        "",
        f"files       plan      {_short(res['masks'])}",
        f"            tile map  {_short(res['tile_map'])}",
        f"            kernels   {len(res['kernels'])} generated Triton sources in {_short(kdir, 45)}",
        f"done in {res['wall_s']:.0f} s.  --full adds the per-layer table; patchc inspect shows the plan",
    ]
    if full:
        lines += ["", *layer_table(res["report"])]
    return lines


def layer_table(report) -> list[str]:
    """One row per compiled linear site: shape, action, 2:4 fraction, sparsity, packed/dense bytes."""
    rows = [("site", "N x K", "action", "2:4 frac", "sparsity", "packed/dense")]
    for dd in report.decisions:
        ratio = f"{dd.packed_bytes / dd.dense_bytes:.3f}" if dd.action == "hybrid" and dd.dense_bytes else "-"
        rows.append((dd.fqn or "<root>", f"{dd.n}x{dd.k}", dd.action, f"{dd.frac_sparse:.2f}", f"{dd.sparsity:.3f}",
                     ratio))
    return format_table(rows, indent="")


def side_by_side(left: str, right: str, width: int = 46, rows: int = 4) -> list[str]:
    """Two texts in columns of ``width`` (at most ``rows`` lines each, the rest cut with …)."""
    a = textwrap.wrap(" ".join(left.split()), width) or [""]
    b = textwrap.wrap(" ".join(right.split()), width) or [""]
    for col in (a, b):
        if len(col) > rows:
            del col[rows:]
            col[-1] = col[-1][: width - 1] + "…"
    n = max(len(a), len(b))
    a, b = a + [""] * (n - len(a)), b + [""] * (n - len(b))
    return [f"  {x:<{width}}  {y}".rstrip() for x, y in zip(a, b)]
