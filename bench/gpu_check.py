"""GPU check of the generated hybrid kernels: correctness and speed on LLaMA-7B linear shapes.

One command on a lent GPU machine (installs this checkout without touching its torch/triton):

    python3 -m pip install -q --no-deps --no-build-isolation -e . && python3 bench/gpu_check.py

For (N, K) in {4096x4096, 11008x4096, 4096x11008} x M in {1, 16, 128, 2048} x fraction of 2:4
tiles f in {0, 0.5, 0.9, 1} x {bf16, fp16}: the relative error against the float64 masked
reference, and the median time of the hybrid kernel, dense ``F.linear`` and (f = 1)
``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt), all three timed the same way: one CUDA
graph of many calls rotating over >= 4 weight copies (working set > 2 x the 60 MB L2 of an
H200), replayed, median per call.  The bandwidth bound is 1 / (1 - 0.4375 f).  Every row is
guarded (an error is recorded, the run goes on); a global ``--budget`` stops early and still
writes ``gpu_check.csv`` / ``gpu_check.md`` under ``$OUT`` (else ``bench/results/``).

Then the cost model is checked against the measurements: per row its predicted time of the
kernel that ran and of dense (``pred_hybrid_us``, ``pred_dense_us``), what its plan picks at that
M (``pick``) and whether that is within 10 % of the best measured of the two (``pick_ok``);
overall the Spearman rank correlation of predicted vs measured times.  Last, within
``--calibrate-budget`` seconds (default 45; 0 skips it), ``patchc.calibrate`` fits the
device constants on these same measurements, stores them (``save_calibration``) and the check is
repeated with them (``model_spearman_calibrated``, ``pick_ok_calibrated``).  Measuring (``--budget``,
default 215 s) + calibration stay within the ~270 s the check used to take.
``--dry-run`` (no GPU needed) builds and packs the weights on CPU, renders every kernel and
AOT-compiles it for sm_90, and writes the resource table instead.
"""
from __future__ import annotations

import argparse
import csv
import datetime
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

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]   # (N, K): q/k/v/o, gate/up, down of LLaMA-7B
MS = [1, 16, 128, 2048]
FRACS = [0.0, 0.5, 0.9, 1.0]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
L2_BYTES = 60e6                                          # H200 L2; rotate so the set is > 2x this
TILE = (128, 128)
TOL = {"bf16": 2e-2, "fp16": 4e-3}
COLUMNS = ["n", "k", "m", "frac", "dtype", "rel_err", "ok", "hybrid_us", "dense_us", "cusparselt_us", "speedup",
           "bound", "of_bound", "cusparselt_speedup", "plan", "kernel", "pred_hybrid_us", "pred_dense_us", "pick",
           "pick_ok", "pick_ok_calibrated", "copies", "seconds", "error", "cusparselt_error"]
_PATTERNS = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0], [0, 1, 0, 1], [0, 0, 1, 1]],
                         dtype=torch.bool)


def bound(f: float) -> float:
    return 1.0 / (1.0 - 0.4375 * f)


def make_mask(n: int, k: int, frac: float, seed: int, dev):
    """A TileMask with round(frac * tiles) random 2:4 tiles, each group one of the 6 patterns."""
    from patchc.types import TileMask, grid_of
    g = torch.Generator(device="cpu").manual_seed(seed)
    nN, nK = grid_of((n, k), TILE)
    kinds = torch.zeros(nN * nK, dtype=torch.uint8)
    kinds[torch.randperm(nN * nK, generator=g)[: round(frac * nN * nK)]] = 1
    pat = torch.randint(0, 6, (n, k // 4), generator=g).to(dev)
    m24 = _PATTERNS.to(dev)[pat].reshape(n, k).cpu()
    return TileMask.from_kinds(TILE, kinds.view(nN, nK), m24)


def clone_packed(p):
    from patchc.packing import PackedWeight
    return PackedWeight(p.shape, p.tile, p.dtype, **{k: v.clone() for k, v in p.buffers().items()})


def time_graph(fn, n_copies: int, replays: int = 10) -> float:
    """Median µs per call of ``fn(i)`` captured in one CUDA graph cycling i over the copies."""
    if not torch.cuda.is_available():                  # --device cpu smoke run: wall clock
        fn(0)
        t = time.perf_counter()
        for i in range(n_copies):
            fn(i)
        return (time.perf_counter() - t) * 1e6 / n_copies
    from patchc.calibrate import time_graph as graph_replay_us
    return graph_replay_us(fn, n_copies, replays)


def env_info() -> dict:
    import triton
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or 'none'})"
    return {"device": dev, "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


class Bench:
    """State of one run: rows, the time budget and the per-(shape, dtype) weights."""

    def __init__(self, args):
        self.args, self.rows, self.t0 = args, [], time.time()
        self.dense_cache: dict = {}
        self.stopped = ""
        self.dev = torch.device(args.device)

    def left(self) -> float:
        return self.args.budget - (time.time() - self.t0)

    def copies(self, nbytes: int) -> int:
        """>= 4 copies and > 2 x L2 in all (at most 64; 4 in a CPU smoke run)."""
        if self.dev.type != "cuda":
            return 4
        return min(64, max(4, math.ceil(2 * L2_BYTES / nbytes) + 1))

    def weights(self, n, k, dt, frac):
        dev = self.dev
        torch.manual_seed(0)
        w = (torch.randn(n, k, device=dev) * 0.02).to(DTYPES[dt])
        tm = make_mask(n, k, frac, seed=n * 7 + k + int(frac * 100), dev=dev)
        from patchc.packing import pack
        packed = pack(w, tm)
        wm = w * tm.mask.to(dev, w.dtype)
        copies = self.copies(packed.nbytes())
        return tm, wm, [packed] + [clone_packed(packed) for _ in range(copies - 1)], copies

    def row(self, n, k, dt, frac, m, wm, packs, copies, runner, tm=None):
        dtype = DTYPES[dt]
        r = dict(n=n, k=k, m=m, frac=frac, dtype=dt, copies=copies, bound=round(bound(frac), 3))
        if tm is not None:     # for the cost-model check (not written to the tables)
            r["_tile_kind"] = tm.tile_kind
        x = torch.randn(m, k, device=self.dev, dtype=dtype)
        y = runner(None, x, packs[0], None)
        ref = x.double() @ wm.double().t()
        r["rel_err"] = float((y.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
        r["ok"] = r["rel_err"] < TOL[dt]
        gk = runner.kernel_for(m, False, self.dev.type != "cuda")
        r["kernel"] = gk.name
        r["_params"] = [gk.spec.block_m, gk.spec.block_n, gk.spec.block_k, gk.spec.split_k, gk.spec.num_warps,
                        gk.spec.num_stages]
        r["plan"] = runner.plan_choice(m)
        r["hybrid_us"] = time_graph(lambda i: runner(None, x, packs[i], None), copies)
        key = (n, k, dt, m)
        if key not in self.dense_cache:                    # dense does not depend on f: time it once
            dense = [wm.clone() for _ in range(max(copies, self.copies(wm.nbytes)))]
            self.dense_cache[key] = time_graph(lambda i: F.linear(x, dense[i]), len(dense))
            del dense
        r["dense_us"] = self.dense_cache[key]
        r["speedup"] = r["dense_us"] / r["hybrid_us"]
        r["of_bound"] = r["speedup"] / r["bound"]
        if frac == 1.0 and not self.args.no_cusparselt:
            try:
                sp = [torch.sparse.to_sparse_semi_structured(wm.clone()) for _ in range(copies)]
                r["cusparselt_us"] = time_graph(lambda i: F.linear(x, sp[i]), copies)
                r["cusparselt_speedup"] = r["dense_us"] / r["cusparselt_us"]
            except Exception as exc:  # noqa: BLE001 -- recorded, not fatal
                r["cusparselt_error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
        return r

    def run(self):
        from patchc.codegen.runner import HybridRunner
        a = self.args
        for n, k in a.shapes:
            for dt in a.dtypes:
                for frac in a.fracs:
                    if self.left() < 0:
                        self.stopped = f"budget of {a.budget:.0f} s spent"
                        return
                    try:
                        tm, wm, packs, copies = self.weights(n, k, dt, frac)
                        runner = make_runner(n, k, dt, tm, a)
                    except Exception as exc:  # noqa: BLE001
                        self.rows.append(dict(n=n, k=k, frac=frac, dtype=dt, error=f"pack: {exc}"[:200]))
                        continue
                    for m in a.ms:
                        if self.left() < 0:
                            self.stopped = f"budget of {a.budget:.0f} s spent"
                            return
                        t = time.time()
                        try:
                            r = self.row(n, k, dt, frac, m, wm, packs, copies, runner, tm)
                        except Exception as exc:  # noqa: BLE001 -- record and go on
                            r = dict(n=n, k=k, m=m, frac=frac, dtype=dt, error=f"{type(exc).__name__}: {exc}"[:300])
                            traceback.print_exc()
                            if "CUDA error" in str(exc) or "illegal" in str(exc):
                                self.rows.append(r)
                                self.stopped = "CUDA context lost"
                                return
                        r["seconds"] = round(time.time() - t, 2)
                        self.rows.append(r)
                        print(fmt_row(r), flush=True)
                    del packs, wm
                    if self.dev.type == "cuda":
                        torch.cuda.empty_cache()


def make_runner(n, k, dt, tm, args):
    """The site runner, forced to Triton at every M: the cost model's plan (--blocks plan, falling
    back to the defaults when it is missing or fails) or the default blocks."""
    from patchc.codegen.runner import HybridRunner
    plan = None
    if args.blocks == "plan":
        try:
            from patchc.codegen.layout import plan_dispatch
            plan = plan_dispatch(tm, DTYPES[dt], device=args.plan_device)
        except Exception as exc:  # noqa: BLE001
            print(f"cost model unavailable ({exc}); default blocks", flush=True)
    kw = dict(cache_dir=args.cache_dir, force=True)
    r = (HybridRunner.from_plan(n, k, DTYPES[dt], TILE, plan, **kw) if plan is not None
         else HybridRunner(n, k, DTYPES[dt], TILE, **kw))
    r.plan_choice = lambda m: ("default" if plan is None else "dense" if plan.select(m) == "dense" else "hybrid")
    return r


def dry_run(args) -> list[dict]:
    """CPU only: pack every shape once, check unpack, render all specs, AOT-compile for sm_90."""
    from patchc.codegen.asm import compile_many
    from patchc.packing import pack, unpack
    rows, kernels = [], []
    for n, k in args.shapes:
        w = torch.randn(n, k).to(torch.bfloat16)
        for frac in args.fracs:
            tm = make_mask(n, k, frac, seed=0, dev="cpu")
            ok = bool(torch.equal(unpack(pack(w, tm)), w * tm.mask.to(w.dtype)))
            for dt in args.dtypes:
                runner = make_runner(n, k, dt, tm, args)
                for m in args.ms:
                    gk = runner.kernel_for(m, False, False)
                    kernels.append(gk)
                    rows.append(dict(n=n, k=k, m=m, frac=frac, dtype=dt, plan=runner.plan_choice(m), kernel=gk.name,
                                     pack_roundtrip=ok))
    t = time.time()
    compile_many(sorted({str(g.path) for g in kernels}), ["sm_90"])
    print(f"AOT-compiled {len({g.key for g in kernels})} kernels for sm_90 in {time.time() - t:.1f} s")
    for r, gk in zip(rows, kernels):
        res = gk.resources("sm_90")
        r.update({f: res.get(f) for f in ("registers", "shared_bytes", "spill_stores", "spill_loads")})
        r["wgmma"] = "wgmma" in gk.asm("sm_90", "ptx")
        print(fmt_row(r))
    return rows


# ---- the cost model against the measurements -----------------------------------------------------
def _points(rows) -> list[dict]:
    """The measured rows as calibration points (patchc.calibrate's format)."""
    pts = []
    for r in rows:
        if r.get("error") or "hybrid_us" not in r or "_tile_kind" not in r:
            continue
        base = dict(n=r["n"], k=r["k"], m=r["m"], dtype=r["dtype"], frac=r["frac"])
        pts.append(dict(base, kind="dense", tile_kind=None, params=None, us=r["dense_us"]))
        pts.append(dict(base, kind="hybrid", tile_kind=r["_tile_kind"].tolist(), params=r["_params"], us=r["hybrid_us"]))
    return pts


def check_model(rows, spec, suffix: str = "") -> dict:
    """Per row: predicted hybrid / dense µs, the plan's pick at that M and whether it is within 10 %
    of the best measured of the two; overall the Spearman rank correlation (predicted vs measured)."""
    from patchc.calibrate import predict, spearman
    from patchc.codegen.layout import plan_dispatch
    pts = _points(rows)
    if not pts:
        return {}
    pred = predict(pts, spec)
    meas = np.array([p["us"] for p in pts])
    ok = np.isfinite(pred)
    done = [r for r in rows if not r.get("error") and "hybrid_us" in r and "_tile_kind" in r]
    plans = {}
    for i, r in enumerate(done):
        if not suffix:
            r["pred_dense_us"], r["pred_hybrid_us"] = float(pred[2 * i]), float(pred[2 * i + 1])
        key = (r["n"], r["k"], r["dtype"], r["frac"])
        if key not in plans:   # the plan reads the tile map only
            tm = types.SimpleNamespace(tile=TILE, tile_kind=r["_tile_kind"], shape=(r["n"], r["k"]))
            plans[key] = plan_dispatch(tm, DTYPES[r["dtype"]], device=spec)
        pick = "dense" if plans[key].select(r["m"]) == "dense" else "hybrid"
        best = min(r["hybrid_us"], r["dense_us"])
        r["pick" + suffix] = pick
        r["pick_ok" + suffix] = bool((r["hybrid_us"] if pick == "hybrid" else r["dense_us"]) <= 1.1 * best)
    picks = [r["pick_ok" + suffix] for r in done]
    return {"model_spearman" + suffix: round(spearman(pred[ok], meas[ok]), 4),
            "model_picks_within_10pct" + suffix: f"{sum(picks)}/{len(picks)}"}


def calibrate_and_recheck(rows, budget: float) -> dict:
    """Fit the device constants on the measured rows (``patchc.calibrate``), store them, and
    check the model again with them."""
    from patchc.calibrate import run
    from patchc.codegen.devices import get_device
    t = time.time()
    pts = _points(rows)
    if not pts:
        return {"calibration": "no measurement to fit"}
    res = run(budget_s=budget * 0.8, save=True, points=pts)
    out = {"calibration": f"{res['device']}: " + ", ".join(f"{k}={v:.3g}" for k, v in res["values"].items())
           + f" (log-error {res['loss_before']:.3f} -> {res['loss_after']:.3f}; stored in {res['saved']})"}
    if time.time() - t < budget:
        out.update(check_model(rows, get_device(), suffix="_calibrated"))
    out["calibration_seconds"] = round(time.time() - t, 1)
    return out


def fmt_row(r: dict) -> str:
    return "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items())


def write(rows, info, out: Path, stopped: str, dry: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = [{c: v for c, v in r.items() if not c.startswith("_")} for r in rows]
    cols = list(dict.fromkeys([c for c in COLUMNS if any(c in r for r in rows)] + [c for r in rows for c in r]
                              + list(info)))
    with open(out / "gpu_check.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=cols)
        wr.writeheader()
        for r in rows:
            wr.writerow({**info, **r})
    lines = [f"# patchc GPU check{' (dry run: AOT sm_90, no GPU)' if dry else ''}", "",
             *(f"- {k}: {v}" for k, v in info.items()),
             f"- stopped early: {stopped}" if stopped else "- complete", "",
             "| " + " | ".join(c for c in cols if c not in info) + " |",
             "|" + "---|" * len([c for c in cols if c not in info])]
    for r in rows:
        lines.append("| " + " | ".join(f"{r.get(c, ''):.4g}" if isinstance(r.get(c), float) else str(r.get(c, ""))
                                      for c in cols if c not in info) + " |")
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out / 'gpu_check.csv'} and {out / 'gpu_check.md'}")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="M in {1, 2048}, f in {0.5, 1}, bf16 only")
    p.add_argument("--dry-run", action="store_true", help="no GPU: pack, render, AOT-compile for sm_90")
    p.add_argument("--budget", type=float, default=215.0, help="seconds for the measurements (default 215)")
    p.add_argument("--calibrate-budget", type=float, default=45.0,
                   help="seconds to fit the cost model's device constants on the measurements (default 45; 0: skip)")
    p.add_argument("--out", default=os.environ.get("OUT") or str(Path(__file__).parent / "results"))
    p.add_argument("--cache-dir", default=None, help="kernel cache dir (default: patchc's)")
    p.add_argument("--shapes", default=None, help="e.g. 4096x4096,11008x4096")
    p.add_argument("--no-cusparselt", action="store_true")
    p.add_argument("--blocks", choices=("plan", "default"), default="plan",
                   help="kernel launch parameters: the cost model's plan (default) or launch.default_blocks")
    p.add_argument("--plan-device", default=None, help="device the cost model plans for (default: the GPU)")
    p.add_argument("--device", default="cuda", help="cuda; 'cpu' is a smoke run (TRITON_INTERPRET=1, tiny shapes)")
    a = p.parse_args(argv)
    a.shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")] if a.shapes else SHAPES
    a.ms, a.fracs, a.dtypes = ([1, 2048], [0.5, 1.0], ["bf16"]) if a.quick else (MS, FRACS, list(DTYPES))
    return a


def main(argv=None) -> int:
    a = parse(argv)
    info = env_info()
    print(info, flush=True)
    if a.dry_run:
        write(dry_run(a), info, Path(a.out), "", True)
        return 0
    if a.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --dry-run", file=sys.stderr)
        return 2
    b = Bench(a)
    try:
        b.run()
    except KeyboardInterrupt:
        b.stopped = "interrupted"
    finally:
        for step, fn in (("cost model check", lambda: check_model(b.rows, _planning_device(a))),
                         ("calibration", lambda: calibrate_and_recheck(b.rows, a.calibrate_budget)
                          if a.calibrate_budget > 0 and a.device == "cuda" else {})):
            try:
                info.update(fn())
            except Exception as exc:  # noqa: BLE001 -- recorded, the tables are still written
                traceback.print_exc()
                info[step] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
        write(b.rows, info, Path(a.out), b.stopped, False)
    return 0


def _planning_device(args):
    from patchc.codegen.devices import get_device
    return get_device(args.plan_device)


if __name__ == "__main__":
    sys.exit(main())
