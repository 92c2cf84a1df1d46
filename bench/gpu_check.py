"""GPU check of the generated kernels: correctness, speed, and the cost model's ranking (<= 6 minutes).

One command on a GPU machine (installs this checkout without touching its torch/triton):

    python3 -m pip install -q --no-deps --no-build-isolation -e . && python3 bench/gpu_check.py

For LLaMA-7B linear shapes, bf16, 128 x 128 tiles, 2:4 tile fractions 0.5 and 0.9 and M in {1, 16, 64}
(then the finer ``--tiles``, 64 x 64 and 32 x 32, on the first shape at the first fraction, last so that
the budget cuts them first): the cost
model (``codegen.layout``, planning for this GPU) ranks every candidate kernel; the best ``--top``
of them and the one its plan picks are compiled ahead (``asm.compile_many``, in parallel child
processes: the launches then hit Triton's cache), checked against the float64 masked reference,
and timed with dense ``F.linear`` the same way -- one CUDA graph of many calls rotating over
weight copies larger than 2 x L2, median per call.  Per (shape, f, M): the Spearman correlation of
predicted vs measured times (candidates and dense) and whether the plan's pick is within 10 % of
the best measured; overall the median Spearman (target >= 0.9) and the share of picks within
10 % (target: all).  Then, within ``--calibrate-budget`` seconds, ``patchc.calibrate`` fits
the device constants on these measurements, stores them, and the check is repeated with them.

Writes ``gpu_check.csv`` / ``gpu_check.md`` (per kernel and M: measured and predicted µs, rank
columns) and ``gpu_check.json`` under ``--out`` (default ``$OUT``, else ``bench/results/``), with
the device, versions and date.  ``--dry-run`` (no GPU) plans, packs and AOT-compiles for sm_90.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import itertools
import json
import math
import os
import platform
import sys
import time
import traceback
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
MS = [1, 16, 64]
FRACS = [0.5, 0.9]
TILES = "128x128,64x64,32x32"                            # the first on every point, the rest on one shape
L2_BYTES = 60e6                                          # H200 L2; rotate so the set is > 2x this
TOL = {"bf16": 2e-2, "fp16": 4e-3}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_PATTERNS = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0], [0, 1, 0, 1], [0, 0, 1, 1]],
                         dtype=torch.bool)


def bound(f: float) -> float:
    return 1.0 / (1.0 - 0.4375 * f)


def make_mask(n: int, k: int, frac: float, seed: int, tile=(128, 128)):
    """A TileMask with round(frac * tiles) random 2:4 tiles, each group one of the 6 patterns."""
    from patchc.types import TileMask, grid_of
    g = torch.Generator().manual_seed(seed)
    nN, nK = grid_of((n, k), tile)
    kinds = torch.zeros(nN * nK, dtype=torch.uint8)
    kinds[torch.randperm(nN * nK, generator=g)[: round(frac * nN * nK)]] = 1
    m24 = _PATTERNS[torch.randint(0, 6, (n, k // 4), generator=g)].reshape(n, k)
    return TileMask.from_kinds(tile, kinds.view(nN, nK), m24)


def parse_tiles(s: str) -> list:
    """argparse type: ``128x128,64x64`` -> [(128, 128), (64, 64)] (each checked by patchc.cliutil.parse_tile)."""
    from patchc.cliutil import parse_tile
    return [parse_tile(t) for t in s.split(",")]


def tile_name(tile) -> str:
    return f"{tile[0]}x{tile[1]}"


def env_info() -> dict:
    import triton
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or 'none'})"
    return {"device": dev, "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def time_graph(fn, n_copies: int) -> float:
    from patchc.calibrate import time_graph as graph_replay_us
    return graph_replay_us(fn, n_copies)


def plan_points(args, dev):
    """Per (tile, shape, dtype, f): the tile mask, the plan, and per M the kernels to time (the model's
    ``--top`` candidates and the plan's pick).  The first tile on every shape and fraction, the
    others on the first shape at the first fraction."""
    from patchc.codegen.layout import DENSE, _site, plan_dispatch
    out = []
    grid = [(args.tiles[0], s, f) for s in args.shapes for f in args.fracs]
    grid += [(t, args.shapes[0], args.fracs[0]) for t in args.tiles[1:]]
    for (tile, (n, k), f), dt in itertools.product(grid, args.dtypes):
        tm = make_mask(n, k, f, seed=n * 7 + k + int(f * 100), tile=tile)
        plan = plan_dispatch(tm, dt, dev)
        site, _ = _site(tm, dt, dev)
        per_m = {}
        for m in args.ms:
            ranked = sorted(site.cands, key=lambda c: site.hybrid(c, m).us)
            ranked = [c for c in ranked if math.isfinite(site.hybrid(c, m).us)][: args.top]
            pick = plan.select(m)
            if pick != DENSE and pick not in ranked:
                ranked.append(pick)
            per_m[m] = (pick, ranked)
        out.append(dict(n=n, k=k, dt=dt, f=f, tile=tile, tm=tm, plan=plan, site=site, per_m=per_m))
    return out


def precompile(points, arch: str, args) -> dict:
    """Every kernel to time, AOT-compiled for ``arch`` in parallel child processes (the JIT then
    finds Triton's cache warm).  Returns {spec: GeneratedKernel}."""
    from concurrent.futures import ThreadPoolExecutor

    from patchc.codegen.asm import compile_many
    from patchc.codegen.cache import get_kernel
    kernels = {}
    for p in points:
        for _, ranked in p["per_m"].values():
            for c in ranked:
                s = c.spec(p["n"], p["k"], p["dt"], p["tile"])
                kernels.setdefault(s, get_kernel(s, args.cache_dir))
    gks = list(kernels.values())
    chunks = [gks[i::args.jobs] for i in range(args.jobs)]
    t = time.time()
    with ThreadPoolExecutor(args.jobs) as ex:
        list(ex.map(lambda ch: compile_many(ch, [arch]) if ch else None, chunks))
    print(f"AOT-compiled {len(gks)} kernels for {arch} in {time.time() - t:.1f} s ({args.jobs} processes)", flush=True)
    return kernels


def measure(points, kernels, args, t0) -> list[dict]:
    """Rows: per (shape, dtype, f, M) dense and every kernel to time."""
    from patchc.codegen.launch import launch
    from patchc.packing import PackedWeight, pack
    rows = []
    for p in points:
        n, k, dt, f = p["n"], p["k"], p["dt"], p["f"]
        if time.time() - t0 > args.budget:
            break
        dtype = DTYPES[dt]
        torch.manual_seed(0)
        w = (torch.randn(n, k, device="cuda") * 0.02).to(dtype)
        wm = w * p["tm"].mask.to("cuda", dtype)
        packed = pack(w, p["tm"], p["plan"].row_order)
        copies = min(64, max(4, math.ceil(2 * L2_BYTES / packed.nbytes()) + 1))
        packs = [packed] + [PackedWeight(packed.shape, packed.tile, packed.dtype,
                                         **{b: v.clone() for b, v in packed.buffers().items()})
                            for _ in range(copies - 1)]
        dense = [wm.clone() for _ in range(min(64, max(4, math.ceil(2 * L2_BYTES / wm.nbytes) + 1)))]
        for m, (pick, ranked) in p["per_m"].items():
            if time.time() - t0 > args.budget:
                break
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            ref = x.double() @ wm.double().t()
            name = "dense" if pick == "dense" else kernels[pick.spec(n, k, dt, p["tile"])].name
            base = dict(n=n, k=k, tile=tile_name(p["tile"]), dtype=dt, frac=f, m=m, bound=round(bound(f), 4),
                        plan_pick=name)
            rows.append(base | dict(kernel="dense", measured_us=time_graph(lambda i: F.linear(x, dense[i]), len(dense)),
                                    predicted_us=float(p["site"].dense_us([m])[0]), rel_err=0.0, ok=True))
            for c in ranked:
                gk = kernels[c.spec(n, k, dt, p["tile"])]
                r = base | dict(kernel=gk.name, predicted_us=p["site"].hybrid(c, m).us)
                try:
                    y = launch(gk, x, packs[0])
                    r["rel_err"] = float((y.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
                    r["ok"] = r["rel_err"] < TOL[dt]
                    r["measured_us"] = time_graph(lambda i: launch(gk, x, packs[i]), copies)
                except Exception as exc:  # noqa: BLE001 -- recorded, the run goes on
                    r["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                    traceback.print_exc()
                    if "CUDA error" in str(exc) or "illegal" in str(exc):
                        rows.append(r)
                        return rows
                rows.append(r)
                print(fmt_row(r), flush=True)
        del packs, dense, packed, w, wm
        torch.cuda.empty_cache()
    return rows


def summarise(rows, suffix: str = "") -> dict:
    """Per point the Spearman of predicted vs measured and whether the pick is within 10 % of the best."""
    from patchc.calibrate import spearman
    pred_col = "predicted_us" + suffix
    groups: dict = {}
    for r in rows:
        if "measured_us" in r and pred_col in r:
            groups.setdefault((r["n"], r["k"], r["tile"], r["dtype"], r["frac"], r["m"]), []).append(r)
    rhos, picks = [], []
    for g in groups.values():
        meas = np.array([r["measured_us"] for r in g])
        if len(g) >= 3:
            rho = spearman([r[pred_col] for r in g], meas)
            rhos.append(rho)
            for r in g:
                r["spearman" + suffix] = round(rho, 3)
        pick = g[0]["plan_pick"] if not suffix else g[0].get("plan_pick" + suffix, g[0]["plan_pick"])
        chosen = [r["measured_us"] for r in g if r["kernel"] == pick]
        if chosen:
            ok = chosen[0] <= 1.1 * meas.min()
            picks.append(ok)
            for r in g:
                r["pick_within_10pct" + suffix] = ok
    return {"spearman_median" + suffix: round(float(np.median(rhos)), 3) if rhos else None,
            "spearman_min" + suffix: round(float(np.min(rhos)), 3) if rhos else None,
            "picks_within_10pct" + suffix: f"{sum(picks)}/{len(picks)}"}


def calibrate_and_recheck(rows, points, budget: float) -> dict:
    """Fit the device constants on the measured rows, store them, and re-rank with them."""
    from patchc.calibrate import run
    from patchc.codegen import layout
    from patchc.codegen.devices import get_device
    pts = []
    by_key = {(p["n"], p["k"], tile_name(p["tile"]), p["dt"], p["f"]): p for p in points}
    for r in rows:
        if "measured_us" not in r:
            continue
        p = by_key[(r["n"], r["k"], r["tile"], r["dtype"], r["frac"])]
        base = dict(n=r["n"], k=r["k"], m=r["m"], dtype=r["dtype"], frac=r["frac"], tile=list(p["tile"]),
                    us=r["measured_us"])
        if r["kernel"] == "dense":
            pts.append(base | dict(kind="dense", tile_kind=None, candidate=None))
        else:
            cand = next(c for c in p["per_m"][r["m"]][1]
                        if c.spec(r["n"], r["k"], r["dtype"], p["tile"]).name == r["kernel"])
            pts.append(base | dict(kind="hybrid", tile_kind=p["tm"].tile_kind.tolist(), candidate=cand.to_dict()))
    if not pts:
        return {"calibration": "no measurement to fit"}
    res = run(budget_s=budget, save=True, points=pts)
    layout._SITES.clear()
    dev = get_device()
    for p in points:                              # the model's numbers and picks with the fitted constants
        p["plan_cal"] = layout.plan_dispatch(p["tm"], p["dt"], dev)
        p["site_cal"], _ = layout._site(p["tm"], p["dt"], dev)
    for r in rows:
        p = by_key[(r["n"], r["k"], r["tile"], r["dtype"], r["frac"])]
        site = p["site_cal"]
        if r["kernel"] == "dense":
            r["predicted_us_calibrated"] = float(site.dense_us([r["m"]])[0])
        else:
            c = next(c for c in p["per_m"][r["m"]][1]
                     if c.spec(r["n"], r["k"], r["dtype"], p["tile"]).name == r["kernel"])
            r["predicted_us_calibrated"] = site.hybrid(c, r["m"]).us
        pick = p["plan_cal"].select(r["m"])
        r["plan_pick_calibrated"] = "dense" if pick == "dense" else pick.spec(r["n"], r["k"], r["dtype"], p["tile"]).name
    return {"calibration": f"{res['device']}: " + ", ".join(f"{k}={v:.3g}" for k, v in res["values"].items())
            + f" (log-error {res['loss_before']:.3f} -> {res['loss_after']:.3f}; stored in {res['saved']})",
            **summarise(rows, "_calibrated")}


def dry_run(args) -> list[dict]:
    """CPU only: plan, pack and check unpack, render and AOT-compile every kernel for sm_90."""
    from patchc.codegen.devices import load_device
    from patchc.packing import pack, unpack
    dev = load_device(args.plan_device or "h200")
    points = plan_points(args, dev)
    kernels = precompile(points, "sm_90", args)
    rows = []
    for p in points:
        w = torch.randn(p["n"], p["k"]).to(DTYPES[p["dt"]])
        ok = bool(torch.equal(unpack(pack(w, p["tm"], p["plan"].row_order)), w * p["tm"].mask.to(w.dtype)))
        for m, (pick, ranked) in p["per_m"].items():
            for c in ranked:
                gk = kernels[c.spec(p["n"], p["k"], p["dt"], p["tile"])]
                res = gk.resources("sm_90")
                rows.append(dict(n=p["n"], k=p["k"], tile=tile_name(p["tile"]), dtype=p["dt"], frac=p["f"], m=m, kernel=gk.name,
                                 plan_pick=c == pick, predicted_us=round(p["site"].hybrid(c, m).us, 3),
                                 pack_roundtrip=ok, **{f: res.get(f) for f in ("registers", "shared_bytes",
                                                                                "spill_stores", "pipeline_depth")}))
    return rows


def fmt_row(r: dict) -> str:
    return "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items())


def write(rows, info, out: Path, dry: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cols = list(dict.fromkeys(c for r in rows for c in r))
    with open(out / "gpu_check.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(info) + cols)
        wr.writeheader()
        for r in rows:
            wr.writerow({**info, **r})
    (out / "gpu_check.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1, default=str))
    lines = [f"# patchc GPU check{' (dry run: AOT sm_90, no GPU)' if dry else ''}", "",
             *(f"- {k}: {v}" for k, v in info.items()), "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r.get(c, ''):.4g}" if isinstance(r.get(c), float) else str(r.get(c, ""))
                                      for c in cols) + " |")
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[: len(info) + 3]))
    print(f"wrote {out / 'gpu_check.csv'}, {out / 'gpu_check.md'} and {out / 'gpu_check.json'}")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="4096x4096 only, f = 0.9, M in {1, 16}")
    p.add_argument("--dry-run", action="store_true", help="no GPU: plan, pack, render, AOT-compile for sm_90")
    p.add_argument("--budget", type=float, default=240.0, help="seconds for the measurements (default 240)")
    p.add_argument("--calibrate-budget", type=float, default=40.0,
                   help="seconds to fit the cost model's device constants on the measurements (default 40; 0: skip)")
    p.add_argument("--top", type=int, default=4, help="candidates timed per point, best first by the model")
    p.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1), help="parallel AOT compile processes")
    p.add_argument("--out", default=os.environ.get("OUT") or str(Path(__file__).parent / "results"))
    p.add_argument("--cache-dir", default=None, help="kernel cache dir (default: patchc's)")
    p.add_argument("--shapes", default=None, help="e.g. 4096x4096,11008x4096")
    p.add_argument("--tiles", default=parse_tiles(TILES), type=parse_tiles,
                   help=f"tiles (rows x cols), comma list: the first on every point, the others on the first shape "
                        f"at the first fraction (default {TILES})")
    p.add_argument("--dtypes", default="bf16", help="comma list of bf16, fp16 (default bf16)")
    p.add_argument("--plan-device", default=None, help="device the cost model plans for (default: the GPU)")
    a = p.parse_args(argv)
    a.shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")] if a.shapes else SHAPES
    a.dtypes = [d.strip() for d in a.dtypes.split(",")]
    a.ms, a.fracs = MS, FRACS
    if a.quick:
        a.shapes, a.ms, a.fracs = a.shapes[:1], [1, 16], [0.9]
    return a


def main(argv=None) -> int:
    a = parse(argv)
    info = env_info()
    print(info, flush=True)
    if a.dry_run:
        write(dry_run(a), info, Path(a.out), True)
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device: use --dry-run", file=sys.stderr)
        return 2
    from patchc.codegen.devices import get_device
    t0 = time.time()
    dev = get_device(a.plan_device)
    info["planning_device"] = f"{dev.name} (sm_{dev.arch}, {dev.sm_count} SMs)"
    points = plan_points(a, dev)
    kernels = precompile(points, f"sm_{dev.arch}", a)
    rows = []
    try:
        rows = measure(points, kernels, a, t0)
    except KeyboardInterrupt:
        info["stopped"] = "interrupted"
    finally:
        info.update(summarise(rows))
        info["errors"] = sum(1 for r in rows if r.get("error") or r.get("ok") is False)
        if a.calibrate_budget > 0 and rows:
            try:
                info.update(calibrate_and_recheck(rows, points, a.calibrate_budget))
            except Exception as exc:  # noqa: BLE001 -- recorded, the tables are still written
                traceback.print_exc()
                info["calibration"] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
        info["seconds"] = round(time.time() - t0, 1)
        write(rows, info, Path(a.out), False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
