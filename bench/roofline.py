"""Roofline of the generated kernels without a GPU: what each kernel the planner picks executes per
tile, against what the GPU can issue at full memory bandwidth (``patchc bench roofline``).

    python bench/roofline.py                       # sm_90 (H200) and sm_80 (A100), compiles as launched
    python bench/roofline.py --targets sm_90 --quick   # the shipped SASS counts, no compile

For LLaMA-7B linear shapes (4096x4096, 11008x4096, 4096x11008), bf16 and fp16, 2:4 tile fractions
0.5 / 0.7 / 0.9 (random tile maps) and M = 1, 4, 16, 64: the kernel the planner picks
(``plan_dispatch(...).select(m)``; "dense" where it dispatches to dense), compiled for the target as
a launch specialises it (``GeneratedKernel.loops``), and per 128x128 tile of its 2:4 loop and of its
dense loop: warp-instructions, and each pipe's demand when tiles stream at the datasheet bandwidth
(1.0 = the pipe saturated: issue, integer, load/store, FP32, tensor); the grid against the SMs;
the predicted time against dense and against the bandwidth bound 1 / (1 - 0.4375 f).

Writes ``<out>/roofline.json`` (one object per row; rows of other Triton versions already there are
kept, so running it under each version fills both) and ``<out>/roofline.md``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import types
from pathlib import Path

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
DTYPES = ["bf16", "fp16"]
FRACS = [0.5, 0.7, 0.9]
MS = [1, 4, 16, 64]
TILE = (128, 128)
DEVICE_OF = {"sm_90": "h200", "sm_80": "a100"}
OUT = Path(__file__).resolve().parent / "results"
# the targets of the decode kernels (checked on the rows: bf16, f = 0.9, M = 1 and 16)
TARGET_SHAPES = [(4096, 4096), (11008, 4096)]
LIMITS = {"loop_24_issue_demand": 0.7, "loop_24_int_demand": 1.0, "loop_24_lsu_demand": 1.0}


def bound(f: float) -> float:
    return 1.0 / (1.0 - 0.4375 * f)


def tile_map(n, k, frac, seed):
    """A random tile map with a fraction ``frac`` of 2:4 tiles (the planner reads only the tile map)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    nn_, nk = -(-n // TILE[0]), -(-k // TILE[1])
    kind = torch.zeros(nn_ * nk, dtype=torch.uint8)
    kind[torch.randperm(nn_ * nk, generator=g)[: round(frac * nn_ * nk)]] = 1
    return types.SimpleNamespace(tile=TILE, tile_kind=kind.view(nn_, nk), shape=(n, k))


def loop_demands(spec, loops, dev) -> dict:
    """Per 128x128 tile of each loop: warp-instructions and every pipe's demand at full bandwidth."""
    tn, tk = spec.tile
    e = 2 if spec.dtype != "fp32" else 4
    per_iter = spec.num_warps * -(-tn // spec.block_n) / spec.block_t        # warp-iterations per tile
    out = {}
    for name, lp, tile_bytes in (("24", loops[0], tn * tk * (e / 2 + 1 / 8)), ("dense", loops[1], tn * tk * e)):
        per_tile = {p: lp["pipes"].get(p, 0) * per_iter for p in ("int", "lsu", "fp")}
        per_tile["issue"] = lp["instructions"] * per_iter
        per_tile["tensor"] = 2.0 * spec.block_m * tn * tk if spec.strategy == "mma" else 0.0
        d = dev.demand(per_tile, tile_bytes)
        out[f"loop_{name}_instructions_per_tile"] = round(per_tile["issue"], 1)
        out[f"loop_{name}_instructions_per_iteration"] = lp["instructions"]
        for p in ("issue", "int", "lsu", "fp", "tensor"):
            out[f"loop_{name}_{p}_demand"] = round(d[p], 3)
    return out


def rows_for(target: str, quick: bool = False, shapes=SHAPES, dtypes=DTYPES, fracs=FRACS, ms=MS,
             cache_dir=None) -> list[dict]:
    """One row per (shape, dtype, fraction, M) on ``target``."""
    import triton

    from patchc.codegen import counts
    from patchc.codegen.asm import compile_many, parse_target
    from patchc.codegen.cache import get_kernel
    from patchc.codegen.devices import load_device
    from patchc.codegen.launch import grid
    from patchc.codegen.layout import DENSE, _site, plan_dispatch
    dev = load_device(DEVICE_OF[target])
    arch = parse_target(target)
    todo = []
    for (n, k) in shapes:
        for dtype in dtypes:
            for f in fracs:
                tm = tile_map(n, k, f, seed=n + 7 * k + int(100 * f))
                plan = plan_dispatch(tm, dtype, dev)
                site = _site(tm, dtype, dev)[0]
                for m in ms:
                    c = plan.select(m)
                    todo.append((n, k, dtype, f, m, tm, c, site))
    kernels = {}
    for n, k, dtype, f, m, tm, c, site in todo:
        if c != DENSE:
            spec = c.spec(n, k, dtype, TILE)
            kernels[spec] = get_kernel(spec, cache_dir)
    if not quick:
        compile_many(list(kernels.values()), [target])
    rows = []
    for n, k, dtype, f, m, tm, c, site in todo:
        frac = float(tm.tile_kind.float().mean())
        dp = site.dense(m)
        dense_us = dp.us
        row = {"shape": [n, k], "dtype": dtype, "frac_24": round(frac, 4), "m": m, "target": target,
               "device": dev.name, "triton": triton.__version__, "sms": dev.sm_count, "bound": round(bound(frac), 4),
               "dense_us": round(dense_us, 3), "dense_fixed_us": round(dp.terms["fixed_us"], 3)}
        if c == DENSE:
            rows.append(row | {"kernel": "dense", "strategy": "dense", "programs": None, "predicted_us": row["dense_us"],
                               "predicted_speedup": 1.0})
            continue
        spec = c.spec(n, k, dtype, TILE)
        gk = kernels[spec]
        if quick:
            lc = counts.get_counts(spec, arch)
            loops, source = [lc.s, lc.d], lc.source
            res = {"registers": lc.registers, "shared_bytes": lc.shared_bytes, "pipeline_depth": lc.depth}
        else:
            loops, source, res = gk.loops(target), "compiled as launched", gk.resources(target)
        pred = site.hybrid(c, m)
        g = grid(spec, m)
        row |= {"kernel": gk.name, "strategy": spec.strategy, "programs": g[0] * g[1] * g[2], "grid": list(g),
                "predicted_us": round(pred.us, 3), "fixed_us": round(pred.terms["fixed_us"], 3),
                "predicted_speedup": round(dense_us / pred.us, 4),
                "of_bound": round(dense_us / pred.us / bound(frac), 4), "bound_by": pred.terms.get("bound_by"),
                "counts": source, "registers": res.get("registers"), "shared_bytes": res.get("shared_bytes"),
                "pipeline_depth": res.get("pipeline_depth")}
        row |= loop_demands(spec, loops, dev)
        rows.append(row)
    return rows


def check_targets(rows) -> list[dict]:
    """The decode targets on the rows (bf16, f = 0.9, sm_90, M = 1 and 16), per Triton version."""
    out = []
    for r in rows:
        if not (r["target"] == "sm_90" and r["dtype"] == "bf16" and abs(r["frac_24"] - 0.9) < 0.02
                and r["m"] in (1, 16) and tuple(r["shape"]) in TARGET_SHAPES):
            continue
        checks = {}
        if r["strategy"] != "dense":
            checks |= {k: r[k] <= v for k, v in LIMITS.items()}
            if r["m"] == 1:
                checks["programs_ge_sms"] = r["programs"] >= r["sms"]
        checks["speedup_ge_0.85_bound"] = r["predicted_speedup"] >= 0.85 * r["bound"]
        checks["speedup_le_bound"] = r["predicted_speedup"] <= r["bound"] + 1e-9
        out.append({"triton": r["triton"], "shape": r["shape"], "m": r["m"], "kernel": r["kernel"], **checks})
    return out


def render_md(rows, date: str) -> str:
    versions = sorted({r["triton"] for r in rows})
    lines = ["# Roofline of the generated kernels (static: SASS counts, no GPU)", "",
             f"Generated {date} with `python bench/roofline.py` on Triton {', '.join(versions)} "
             f"(Python {platform.python_version()}).  Per 128x128 tile of the kernel's 2:4 loop: warp-"
             "instructions, and each pipe's demand when tiles stream at the datasheet bandwidth "
             "(H200 4.8 TB/s for sm_90, A100 2.04 TB/s for sm_80; 1.00 = saturated).  `speedup`: predicted "
             "time of dense / of the kernel; `bound` = 1 / (1 - 0.4375 f).", ""]
    checks = check_targets(rows)
    if checks:
        lines += ["## Decode targets (bf16, f = 0.9, sm_90, as launched)", "",
                  "| triton | shape | M | kernel | issue <= 0.7 | int <= 1 | lsu <= 1 | programs >= 132 | "
                  ">= 0.85 bound | <= bound |", "|---|---|---|---|---|---|---|---|---|---|"]
        ok = lambda c, k: ("met" if c[k] else "**missed**") if k in c else "-"  # noqa: E731
        for c in checks:
            lines.append(f"| {c['triton']} | {c['shape'][0]}x{c['shape'][1]} | {c['m']} | `{c['kernel']}` | "
                         + " | ".join(ok(c, k) for k in ("loop_24_issue_demand", "loop_24_int_demand",
                                                         "loop_24_lsu_demand", "programs_ge_sms",
                                                         "speedup_ge_0.85_bound", "speedup_le_bound")) + " |")
        lines.append("")
        missed = {(tuple(c["shape"]), c["m"], c["triton"]) for c in checks if not c.get("speedup_ge_0.85_bound", True)}
        notes = [r for r in rows if (tuple(r["shape"]), r["m"], r["triton"]) in missed and r["strategy"] != "dense"
                 and r["target"] == "sm_90" and r["dtype"] == "bf16" and abs(r["frac_24"] - 0.9) < 0.02]
        if notes:
            lines += ["Where `>= 0.85 bound` is missed, fixed costs decide (the bound is a ratio of bytes alone): "
                      "a kernel takes launch + 2 DRAM latencies (its tile-row record, then its first tiles) + "
                      "max(bytes / bandwidth, its busiest SM), dense launch + 1 latency + bytes / bandwidth.", ""]
            for r in notes:
                need = r["dense_us"] / (0.85 * r["bound"]) - (r["predicted_us"] - r["fixed_us"])
                lines.append(f"- triton {r['triton']}, {r['shape'][0]}x{r['shape'][1]}, M = {r['m']}: kernel "
                             f"{r['fixed_us']:.2f} µs fixed + {r['predicted_us'] - r['fixed_us']:.2f} µs, dense "
                             f"{r['dense_fixed_us']:.2f} + {r['dense_us'] - r['dense_fixed_us']:.2f} µs: "
                             f"{r['predicted_speedup']:.2f}x; 0.85 x bound = {0.85 * r['bound']:.2f}x needs the "
                             f"kernel's fixed part <= {need:.2f} µs.")
            lines.append("")
    for v in versions:
        for target in sorted({r["target"] for r in rows if r["triton"] == v}, reverse=True):
            sel = [r for r in rows if r["triton"] == v and r["target"] == target]
            lines += [f"## Triton {v}, {target} ({sel[0]['device']}, {sel[0]['sms']} SMs)", "",
                      "| shape | dtype | f | M | kernel | 2:4 instr/tile | issue | int | lsu | dense loop issue | "
                      "programs | speedup | bound | of bound | bound by |",
                      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for r in sel:
                if r["strategy"] == "dense":
                    lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['dtype']} | {r['frac_24']:.2f} | {r['m']} | "
                                 f"dense | | | | | | | 1.00 | {r['bound']:.2f} | | |")
                    continue
                lines.append(
                    f"| {r['shape'][0]}x{r['shape'][1]} | {r['dtype']} | {r['frac_24']:.2f} | {r['m']} | "
                    f"`{r['kernel'].split('_', 1)[0]} {r['kernel'].split('_', 4)[-1]}` | "
                    f"{r['loop_24_instructions_per_tile']:.0f} | {r['loop_24_issue_demand']:.2f} | "
                    f"{r['loop_24_int_demand']:.2f} | {r['loop_24_lsu_demand']:.2f} | {r['loop_dense_issue_demand']:.2f} | "
                    f"{r['programs']} | {r['predicted_speedup']:.2f} | {r['bound']:.2f} | {r['of_bound']:.2f} | "
                    f"{r['bound_by']} |")
            lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="patchc bench roofline", description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", nargs="+", default=["sm_90", "sm_80"], choices=sorted(DEVICE_OF))
    p.add_argument("--quick", action="store_true", help="read the shipped SASS counts instead of compiling each kernel")
    p.add_argument("--out", type=Path, default=OUT, help=f"folder for roofline.json / .md (default {OUT})")
    p.add_argument("--cache-dir", default=None, help="patchc cache root for the generated kernels")
    args = p.parse_args(argv)
    import triton

    from patchc.files import atomic_write
    rows = []
    for t in args.targets:
        print(f"roofline: {t} ...", file=sys.stderr, flush=True)
        rows += rows_for(t, args.quick, cache_dir=args.cache_dir)
    path = args.out / "roofline.json"
    try:
        old = json.loads(path.read_text())["rows"]
    except (OSError, ValueError, KeyError):
        old = []
    keep = [r for r in old if not (r["triton"] == triton.__version__ and r["target"] in args.targets)]
    rows = keep + rows
    date = datetime.date.today().isoformat()
    atomic_write(path, json.dumps({"date": date, "rows": rows}, indent=1))
    atomic_write(args.out / "roofline.md", render_md(rows, date))
    for c in check_targets(rows):
        print(json.dumps(c), file=sys.stderr)
    print(f"roofline: {len(rows)} rows -> {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
