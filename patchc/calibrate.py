"""Calibrate the cost model on this GPU: time dense matmuls and hybrid kernels, fit the device constants.

    patchc calibrate [--budget 45] [--dry-run]        (GPU only; on CPU it says so and exits 2)

Measures, within ``--budget`` seconds: ``F.linear`` (what the dense baseline models) and the
generated hybrid kernels the planner picks (forced to Triton, so every M times a kernel) on
LLaMA-7B shapes, bf16, 2:4 fractions 0.5 and 1, M in {1, 16, 128, 2048} -- each as one CUDA graph
of calls rotating over weight copies larger than 2 x L2, median per call.  Then fits the fitted
constants of ``codegen.devices.DeviceSpec`` (``bw_eff``, ``mma_eff``, ``warp_ipc``,
``launch_us``, ``mem_latency_ns``, ``sm_bytes_per_clk``) by least squares on the log of
predicted / measured time (coordinate descent in log space, bounded), and stores them with
``save_calibration`` under the device's name: ``load_device`` merges them over the datasheet from
then on.  ``--dry-run`` fits and prints without saving.

Importable pieces: ``measure(budget_s)``, ``fit(points, spec)``, ``predict(points, spec)``,
``spearman(a, b)``, ``run(budget_s, save)``; ``bench/gpu_check.py`` calls ``run`` at its end.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
from typing import Optional

import numpy as np

SHAPES = [(4096, 4096), (11008, 4096)]
FRACS = [0.5, 1.0]
MS = [1, 16, 128, 2048]
TILE = (128, 128)
L2_BYTES = 60e6
# constant -> (lower, upper) bound of the fit
BOUNDS = {"bw_eff": (0.5, 1.0), "mma_eff": (0.3, 1.0), "warp_ipc": (0.15, 1.0), "launch_us": (0.5, 10.0),
          "mem_latency_ns": (250.0, 1200.0), "sm_bytes_per_clk": (24.0, 160.0)}
NO_GPU = ("needs a CUDA GPU to time kernels on, and there is none here; the planner uses the datasheet "
          "constants (codegen/devices.py) until a calibration run on the GPU stores fitted ones")


# ---- rank correlation (no scipy) -------------------------------------------------------------------
def ranks(x) -> np.ndarray:
    """Ranks 1..n with ties given their average rank."""
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x))
    xs = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        r[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return r


def spearman(a, b) -> float:
    """Spearman's rank correlation of two sequences (nan with fewer than 2 points or no spread)."""
    if len(a) < 2:
        return float("nan")
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float(ra @ ra) * float(rb @ rb))
    return float(ra @ rb) / den if den else float("nan")


# ---- timing ---------------------------------------------------------------------------------------
def time_graph(fn, n_copies: int, replays: int = 8) -> float:
    """Median µs per call of ``fn(i)`` captured in one CUDA graph cycling i over the copies."""
    import torch
    for i in range(n_copies):
        fn(i)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(n_copies):
        fn(i)
    torch.cuda.synchronize()
    est = (time.perf_counter() - t0) / n_copies
    calls = n_copies * max(2, min(64, math.ceil(2e-3 / max(est, 1e-6) / n_copies)))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(n_copies):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for j in range(calls):
            fn(j % n_copies)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    del g
    return statistics.median(times)


def _mask(n, k, frac, seed):
    import torch
    from patchc.types import TileMask, grid_of
    g = torch.Generator().manual_seed(seed)
    nn_, nk = grid_of((n, k), TILE)
    kinds = torch.zeros(nn_ * nk, dtype=torch.uint8)
    kinds[torch.randperm(nn_ * nk, generator=g)[: round(frac * nn_ * nk)]] = 1
    keep = torch.zeros(n, k // 4, 4, dtype=torch.bool)
    keep[..., 1::2] = True
    return TileMask.from_kinds(TILE, kinds.view(nn_, nk), keep.reshape(n, k))


def measure(budget_s: float = 30.0, shapes=SHAPES, fracs=FRACS, ms=MS, dtype="bf16") -> list[dict]:
    """Timed points: ``{"kind": "dense"|"hybrid", n, k, m, dtype, frac, tile_kind, candidate, us}``
    (``candidate``: the hybrid kernel's ``codegen.candidates.Candidate`` as a dict; a point may also
    name its ``tile``, (rows, cols), else it is 128 x 128).  Stops when ``budget_s`` is spent."""
    import torch
    import torch.nn.functional as F

    from patchc.codegen.launch import launch
    from patchc.codegen.layout import plan_dispatch
    from patchc.codegen.runner import HybridRunner
    from patchc.packing import pack
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    t0, points = time.time(), []
    for n, k in shapes:
        w = (torch.randn(n, k, device="cuda") * 0.02).to(dt)
        copies = min(32, max(4, math.ceil(2 * L2_BYTES / w.nbytes) + 1))
        dense = [w.clone() for _ in range(copies)]
        for m in ms:
            if time.time() - t0 > budget_s:
                return points
            x = torch.randn(m, k, device="cuda", dtype=dt)
            points.append(dict(kind="dense", n=n, k=k, m=m, dtype=dtype, frac=0.0, tile_kind=None, candidate=None,
                               us=time_graph(lambda i: F.linear(x, dense[i]), copies)))
        del dense
        for frac in fracs:
            tm = _mask(n, k, frac, seed=n + k + int(100 * frac))
            plan = plan_dispatch(tm, dt)
            runner = HybridRunner.from_plan(n, k, dt, TILE, plan, force=True)
            packed = pack(w * tm.mask.to("cuda", dt), tm, plan.row_order)
            packs = [packed] + [dataclasses.replace(packed, **{b: v.clone() for b, v in packed.buffers().items()})
                                for _ in range(copies - 1)]
            for m in ms:
                if time.time() - t0 > budget_s:
                    return points
                x = torch.randn(m, k, device="cuda", dtype=dt)
                gk = runner.kernel_for(m, False, False, force=True)
                s = gk.spec
                cand = dict(strategy=s.strategy, block_m=s.block_m, block_n=s.block_n, block_t=s.block_t,
                            num_warps=s.num_warps, num_stages=s.num_stages, split_k=s.split_k, block_k=s.block_k)
                points.append(dict(kind="hybrid", n=n, k=k, m=m, dtype=dtype, frac=frac,
                                   tile_kind=tm.tile_kind.tolist(), candidate=cand,
                                   kernel=gk.name, us=time_graph(lambda i: launch(gk, x, packs[i]), copies)))
            del packs, packed
        del w
        torch.cuda.empty_cache()
    return points


# ---- the model's predictions and the fit ------------------------------------------------------------
def predict(points, spec) -> np.ndarray:
    """The model's µs for every point with device constants ``spec`` (a DeviceSpec)."""
    import torch

    from patchc.codegen.candidates import Candidate
    from patchc.codegen.cost import HybridModel, Weight, predict_dense
    from patchc.codegen.counts import get_counts
    from patchc.packing import balanced_row_order
    weights, out = {}, []
    for p in points:
        n, k = p["n"], p["k"]
        if p["kind"] == "dense":
            out.append(predict_dense((n, k), p["dtype"], p["m"], spec).us)
            continue
        tile = tuple(p.get("tile") or TILE)
        key = (n, k, tile, p["dtype"], p["frac"])
        if key not in weights:
            kind = torch.tensor(p["tile_kind"], dtype=torch.uint8)
            weights[key] = Weight(kind, (n, k), tile, p["dtype"], balanced_row_order(kind))
        c = Candidate.from_dict(p["candidate"])
        counts = get_counts(c.spec(n, k, p["dtype"], tile), int(spec.arch))
        out.append(float(HybridModel(weights[key], c, spec, counts)([p["m"]])[0]))
    return np.array(out)


def _loss(points, spec, meas) -> float:
    pred = predict(points, spec)
    ok = np.isfinite(pred)
    if not ok.any():
        return math.inf
    return float(np.mean(np.log(pred[ok] / meas[ok]) ** 2)) + 10.0 * float((~ok).mean())


def fit(points, spec, budget_s: float = 15.0, sweeps: int = 3) -> tuple:
    """(fitted spec, {constant: value}, loss before, loss after): coordinate descent on the mean
    squared log error, each constant by golden-section search in log space within ``BOUNDS``."""
    meas = np.array([p["us"] for p in points], dtype=float)
    t0 = time.time()
    best = _loss(points, spec, meas)
    before = best
    inv = (math.sqrt(5) - 1) / 2
    for _ in range(sweeps):
        for name, (lo, hi) in BOUNDS.items():
            if time.time() - t0 > budget_s:
                break
            a, b = math.log(lo), math.log(hi)
            f = lambda v: _loss(points, dataclasses.replace(spec, **{name: math.exp(v)}), meas)  # noqa: E731
            c, d = b - inv * (b - a), a + inv * (b - a)
            fc, fd = f(c), f(d)
            for _ in range(12):
                if fc < fd:
                    b, d, fd = d, c, fc
                    c = b - inv * (b - a)
                    fc = f(c)
                else:
                    a, c, fc = c, d, fd
                    d = a + inv * (b - a)
                    fd = f(d)
            v, fv = (c, fc) if fc < fd else (d, fd)
            if fv < best:
                best, spec = fv, dataclasses.replace(spec, **{name: math.exp(v)})
    return spec, {name: getattr(spec, name) for name in BOUNDS}, before, best


def run(budget_s: float = 45.0, save: bool = True, points: Optional[list] = None) -> dict:
    """Measure (unless ``points`` are given), fit, store; returns a summary dict.  Raises
    RuntimeError without a CUDA GPU."""
    import torch

    from patchc.codegen.devices import get_device, save_calibration
    if not torch.cuda.is_available() and points is None:
        raise RuntimeError(NO_GPU)
    t0 = time.time()
    spec = get_device()
    if points is None:
        points = measure(budget_s * 0.6)
    if not points:
        return dict(device=spec.name, points=0, saved=None, error="no point measured within the budget")
    meas = np.array([p["us"] for p in points])
    pred0 = predict(points, spec)
    fitted, values, before, after = fit(points, spec, budget_s=max(1.0, budget_s - (time.time() - t0)))
    pred1 = predict(points, fitted)
    path = save_calibration(spec.name, values) if save else None
    return dict(device=spec.name, points=len(points), values=values, loss_before=before, loss_after=after,
                spearman_before=spearman(pred0, meas), spearman_after=spearman(pred1, meas),
                saved=str(path) if path else None, seconds=round(time.time() - t0, 1), measured=points,
                predicted_before=pred0.tolist(), predicted_after=pred1.tolist())


# ---- command line -----------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--budget", type=float, default=45.0, help="seconds in all, measuring and fitting (default 45)")
    p.add_argument("--dry-run", action="store_true", help="fit and print, do not store the constants")


def main_args(args) -> int:
    try:
        res = run(args.budget, save=not args.dry_run)
    except RuntimeError as exc:
        print(f"patchc calibrate: {exc}", file=sys.stderr)
        return 2
    print(f"device {res['device']}: {res['points']} points in {res.get('seconds')} s; "
          f"log-error {res.get('loss_before', float('nan')):.4f} -> {res.get('loss_after', float('nan')):.4f}; "
          f"Spearman {res.get('spearman_before', float('nan')):.3f} -> {res.get('spearman_after', float('nan')):.3f}")
    for k, v in (res.get("values") or {}).items():
        print(f"  {k} = {v:.4g}")
    print(f"stored in {res['saved']}" if res.get("saved") else "not stored (--dry-run)")
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``calibrate`` to a ``patchc`` sub-command parser (``subparsers.add_parser``)."""
    p = subparsers.add_parser("calibrate", help="fit the cost model's device constants on this GPU",
                              description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.set_defaults(func=main_args)
    return p


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="patchc calibrate", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return main_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
