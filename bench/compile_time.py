"""Compile time: ``torch.compile(model, backend="patch")`` vs ``backend="inductor"`` (CPU).

A transformers Llama-style model (default: 24 layers, hidden 1536, MLP 4096, 12 heads / 4 KV
heads, vocab 32000: 0.70 B parameters, 0.60 B of them in the 168 planned linears) is built from a
config with random weights (seeded: every process builds the same weights), planned once with
``magnitude_hybrid`` at 35 % (every planned linear gets 2:4 tiles, so every one is rewritten and
packed; the LM head is left dense, as plans do by default) and saved to a mask file.  Then each
measurement runs in its own subprocess:

* ``cold``: fresh, empty ``TORCHINDUCTOR_CACHE_DIR``, ``TRITON_CACHE_DIR`` and ``PATCHC_CACHE_DIR``;
* ``warm``: a second process on the caches the cold one filled.

Time measured = ``torch.compile(...)`` plus the first forward (batch 1, ``--seq`` tokens, under
``torch.inference_mode()``; compilation is lazy, so this is when it happens), after one eager
forward that warms the process (allocator, oneDNN) for both backends alike.  Inside the patch
process patchc's own time comes from what the library reports: each pass's seconds
(``patchc.explain(...).seconds``) and, from ``patchc.counters``, the cost model, codegen (render +
cache files), packing, loading (the mask file) and the reference path's ``W ⊙ M`` per weight,
built at the first call (``reference weight``).  Packing and the reference weight are the weight
preparation: per-byte work, reported apart from the rest of patchc's time.  The rest of the
patch process's time is dynamo + inductor on the rewritten graph.
``overhead = patch cold / inductor cold - 1``.

    python -m bench.compile_time --quick           # 4 layers, a few minutes
    patchc bench compile-time --layers 24 --out bench/results/compile_time.md
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from patchc.cliutil import parse_tile

from . import common
from .common import MODEL, TINY, build_model, env_info, param_count

DTYPES = ("bf16", "fp32")
# patchc's own time by part, from ``patchc.counters`` (seconds) and the passes' ``GraphRecord.seconds``
PARTS = {"loading": "load_seconds", "cost model": "cost_model_seconds", "codegen": "codegen_seconds",
         "packing": "pack_seconds", "reference weight": "masked_weight_seconds"}


def patchc_split(counters: dict, per_pass: dict) -> dict:
    """Seconds by part; ``passes (rest)`` is the passes' time outside the parts timed inside them
    (cost model, codegen, packing)."""
    out = {part: counters.get(key, 0.0) for part, key in PARTS.items()}
    inside = out["cost model"] + out["codegen"] + out["packing"]
    out = {"passes (rest)": max(0.0, sum(per_pass.values()) - inside), **out}
    out["total"] = sum(out.values())
    return {"split": out, "per_pass": per_pass}


# ---- one measurement (runs in the child process) ---------------------------------------------
def _counters() -> dict:
    from torch._dynamo.utils import counters
    keep = {}
    for group in ("inductor", "aot_autograd", "stats", "graph_break"):
        for k, v in counters.get(group, {}).items():
            if any(s in k for s in ("cache", "unique_graphs", "calls_captured")) or group == "graph_break":
                keep[f"{group}.{k}"[:120]] = v
    return keep


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its waited-for children (the C++ compiler
    inductor runs when ``TORCHINDUCTOR_COMPILE_THREADS=1``; a worker pool's are not counted)."""
    import resource
    t = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        ru = resource.getrusage(who)
        t += ru.ru_utime + ru.ru_stime
    return t


def pack_throughput(max_weights: int = 7, repeats: int = 3, model=None) -> Optional[dict]:
    """Re-pack the first registered weights on warm memory: the packing code's own speed (the
    in-compile number also pays for faulting in fresh memory)."""
    import torch
    from patchc.packing import pack
    ws = _packable(model)[:max_weights]
    if not ws:
        return None
    with torch.no_grad():
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            for w, tm, order in ws:
                pack(w, tm, order)
            best = min(best, time.perf_counter() - t)
    nbytes = sum(w.numel() * w.element_size() for w, _, _ in ws)
    return {"weights": len(ws), "dense_bytes": nbytes, "seconds": best, "gbps": nbytes / best / 1e9}


def _packable(model=None) -> list:
    """(weight (out, in), tile mask, row order) of every live, unreleased runtime entry of ``model``
    (every model when None; a fused group as one, its members concatenated)."""
    import torch
    from patchc import runtime
    ids = None if model is None else {id(p) for p in model.parameters()}
    out = []
    for e in runtime.live_entries():
        ws = e.live_weights()
        if e.released or ws is None or (ids is not None and not any(id(w) in ids for w in ws)):
            continue
        w = torch.cat([m.oriented(x) for m, x in zip(e.members, ws)]) if len(ws) > 1 else e.members[0].oriented(ws[0])
        out.append((w.detach(), e.tile_mask, e.row_order))
    return out


def pack_all(model=None) -> Optional[dict]:
    """Pack every weight the compile registered, once, as a compile that packs would (fresh
    memory): on CPU the compile itself packs nothing (the reference path reads the user's
    weights), so this is the packing a GPU compile pays, timed on this CPU."""
    import torch
    from patchc.packing import pack
    ws = _packable(model)
    if not ws:
        return None
    dense = packed = 0
    with torch.no_grad():
        t = time.perf_counter()
        for w, tm, order in ws:
            p = pack(w, tm, order)
            dense, packed = dense + p.dense_nbytes(), packed + p.nbytes()
            del p
        sec = time.perf_counter() - t
    return {"weights": len(ws), "dense_bytes": dense, "packed_bytes": packed, "seconds": sec, "gbps": dense / sec / 1e9}


def measure(spec: dict) -> dict:
    """One compile-time measurement in this process (``spec``: backend, model, dtype, seq, plan,
    inner).  Returns seconds of the compile + first forward, the steady forward, patchc's split."""
    import torch
    model = build_model(spec["model"], spec["dtype"], spec.get("seed", 0))
    ids = torch.randint(0, spec["model"]["vocab"], (1, spec["seq"]), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        t = time.perf_counter()
        model(ids)                                        # warm the process, not the compiler
        eager_s = time.perf_counter() - t
    patch = spec["backend"] == "patch"
    if patch:
        import patchc
        patchc.counters.reset()
        opts = {"plan": spec["plan"], "inner": spec.get("inner", "inductor")}
        backend_kw = dict(backend="patch", options=opts)
    else:
        backend_kw = dict(backend=spec["backend"])
    load0 = os.getloadavg()[0]
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    compiled = torch.compile(model, **backend_kw)
    with torch.inference_mode():
        out = compiled(ids).logits
        first_s = time.perf_counter() - t0
        cpu_first = _cpu_seconds() - cpu0
        t = time.perf_counter()
        compiled(ids)
        forward_s = time.perf_counter() - t
    res = {"backend": spec["backend"], "phase": spec.get("phase", ""), "first_call_s": first_s,
           "forward_s": forward_s, "eager_forward_s": eager_s, "cpu_s": cpu_first,
           "loadavg_before": load0, "loadavg_after": os.getloadavg()[0], "params": param_count(model),
           "finite": bool(torch.isfinite(out).all()), "counters": _counters()}
    if patch:
        from patchc.codegen.cache import stats
        report = patchc.explain(compiled)
        res.update(patchc_split(dict(patchc.counters), report.seconds))
        res["graphs"] = report.graphs
        res["decisions"] = report.counts()
        mem = patchc.memory_report(compiled)["total"]
        res["pack_dense_bytes"] = sum(r["dense_bytes"] for r in patchc.memory_report(compiled)["entries"]
                                      if r["packed_bytes"])
        res["pack_packed_bytes"] = mem["packed_bytes"]
        res["kernel_cache"] = dict(stats)
        res["distinct_kernels"] = len({k.key for k in patchc.kernels(compiled)})
        res["patchc_counters"] = dict(patchc.counters)
        res["pack_all"] = pack_all(model)
        res["pack_warm_memory"] = pack_throughput(model=model)
    res["tree"] = common.tree_state()
    res["compile_threads"] = os.environ.get("TORCHINDUCTOR_COMPILE_THREADS", "default")
    return res


# ---- orchestration (the parent) --------------------------------------------------------------
def _child_env(cache_root: Path, threads: Optional[int], compile_threads: Optional[int] = 1) -> dict:
    env = dict(os.environ)
    if compile_threads:
        env["TORCHINDUCTOR_COMPILE_THREADS"] = str(compile_threads)
    for var, sub in (("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TRITON_CACHE_DIR", "triton"),
                     ("PATCHC_CACHE_DIR", "patchc")):
        env[var] = str(cache_root / sub)
    env.pop("TRITON_INTERPRET", None)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_child(task: str, spec: dict, env: dict, timeout: float = 1800) -> dict:
    """Run ``task`` ("measure" or "plan") in a fresh interpreter; its JSON result."""
    return common.run_child("compile_time", task, spec, env, timeout)


def make_plan_file(spec: dict, path: str) -> dict:
    """(child task "plan") Build the model, plan it with ``magnitude_hybrid``, save the plan."""
    from patchc.prune import magnitude_hybrid
    model = build_model(spec["model"], spec["dtype"], spec.get("seed", 0))
    t = time.perf_counter()
    plan = magnitude_hybrid(model, spec["sparsity"], tuple(spec["tile"]))
    plan_s = time.perf_counter() - t
    plan.save(path)
    per = plan.per_layer()
    return {"plan_s": plan_s, "sparsity": plan.sparsity(), "linears": len(plan), "params": param_count(model),
            "planned_params": sum(m.mask.numel() for m in plan.values()),
            "without_24_tiles": sum(1 for m in plan.values() if m.num_sparse_tiles() == 0),
            "frac_sparse_min": min(v["frac_sparse"] for v in per.values()),
            "frac_sparse_max": max(v["frac_sparse"] for v in per.values())}


def run(args) -> dict:
    """The whole benchmark: plan, then cold and warm runs of both backends, each in a subprocess."""
    model = dict(TINY if args.tiny else MODEL)
    args.tile = tuple(args.tile or ((32, 32) if args.tiny else (128, 128)))
    if args.layers:
        model["layers"] = args.layers
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="patchc-bench-ct-"))
    work.mkdir(parents=True, exist_ok=True)
    base = {"model": model, "dtype": args.dtype, "seq": args.seq, "seed": 0, "inner": args.inner}
    plan_path = str(work / "plan.safetensors")
    t_all = time.perf_counter()
    say = (lambda *a: print(*a, flush=True)) if not args.quiet else (lambda *a: None)
    say(f"planning {model} {args.dtype} at {args.sparsity:.0%} ...")
    plan_info = run_child("plan", {**base, "sparsity": args.sparsity, "tile": list(args.tile), "path": plan_path},
                          _child_env(work / "plan-cache", args.threads))
    say(f"  plan: {plan_info['linears']} linears, sparsity {plan_info['sparsity']:.4f}, "
        f"{plan_info['plan_s']:.1f} s")
    baseline = "eager" if args.inner == "eager" else "inductor"
    runs = []
    for rep in range(args.repeat):
        for backend in (baseline, "patch"):
            caches = work / f"{backend}-{rep}"
            env = _child_env(caches, args.threads, args.compile_threads)
            for phase in ("cold", "warm"):
                spec = {**base, "backend": backend, "phase": phase, "plan": plan_path}
                r = run_child("measure", spec, env)
                r["rep"] = rep
                runs.append(r)
                say(f"  {backend:8s} {phase}: {r['first_call_s']:7.2f} s compile+first forward "
                    f"(forward {r['forward_s']:.3f} s; patchc {r.get('split', {}).get('total', 0):.2f} s; "
                    f"load {r['loadavg_before']:.1f})")
    result = {"env": env_info(), "model": model, "dtype": args.dtype, "seq": args.seq, "sparsity": args.sparsity,
              "tile": list(args.tile), "inner": args.inner, "baseline": baseline, "plan": plan_info, "runs": runs,
              "wall_s": time.perf_counter() - t_all, "threads": args.threads, "command": getattr(args, "cmdline", "")}
    from .compile_time_report import summarize
    result["summary"] = summarize(result)
    if not args.keep:
        import shutil
        shutil.rmtree(work, ignore_errors=True)
    return result


# ---- command line ----------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 24; --quick: 4)")
    p.add_argument("--quick", action="store_true", help="4 layers: a few minutes")
    p.add_argument("--tiny", action="store_true", help="a tiny model (hidden 128, 2 layers): a smoke run")
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="weights and activations (default bf16)")
    p.add_argument("--seq", type=int, default=32, help="tokens of the input, batch 1 (default 32)")
    p.add_argument("--sparsity", type=float, default=0.35, help="plan target sparsity (default 0.35)")
    p.add_argument("--tile", type=parse_tile, default=None, help="tile, e.g. 128x128 (default; --tiny: 32x32)")
    p.add_argument("--inner", choices=("inductor", "eager"), default="inductor",
                   help="inductor (default): patch(inner=inductor) vs inductor; eager: patch(inner=eager) vs "
                        "backend='eager' (a fast smoke run)")
    p.add_argument("--repeat", type=int, default=1, help="repetitions of the 4 runs (default 1)")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the child processes")
    p.add_argument("--compile-threads", type=int, default=1,
                   help="TORCHINDUCTOR_COMPILE_THREADS (default 1: the C++ compiler runs as a waited-for child, "
                        "so its CPU time is counted; 0: inductor's default pool)")
    p.add_argument("--work-dir", default=None, help="plan and caches (default: a fresh temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work dir")
    p.add_argument("--out", default=None, help="write the markdown report there (and .json beside it)")
    p.add_argument("--json", default=None, help="write the raw results as JSON")
    p.add_argument("--quiet", action="store_true")


def main_args(args) -> int:
    if args.quick and not args.layers:
        args.layers = 4
    from .compile_time_report import render_markdown
    result = run(args)
    common.write_report(args.out, render_markdown(result), result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


def main(argv=None) -> int:
    return common.bench_main(argv, "compile_time", __doc__, {"measure": measure, "plan": lambda spec: make_plan_file(
        spec, spec["path"])}, add_arguments, main_args)


if __name__ == "__main__":
    sys.exit(main())
