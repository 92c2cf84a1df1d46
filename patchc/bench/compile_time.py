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
process every part of patchc is timed by wrapping its functions: the passes (``GraphRecord.seconds``),
and inside them the cost model (``plan_dispatch``), codegen (``get_kernel``: render + cache
files), packing (``SiteEntry.repack``), plus loading (the mask file; generated kernel modules are
imported at the first Triton launch, which never happens on CPU) and the reference path's
``W ⊙ M`` per weight, built at the first call (``reference weight``).  Packing and the reference
weight are the weight preparation: per-byte work, reported apart from the rest of patchc's time.  The rest of the patch process's time is dynamo + inductor
on the rewritten graph.  ``overhead = patch cold / inductor cold - 1``.

    python -m patchc.bench.compile_time --quick           # 4 layers, a few minutes
    patchc bench compile-time --layers 24 --out bench/results/compile_time.md
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from . import child

MODEL = dict(hidden=1536, intermediate=4096, layers=24, heads=12, kv_heads=4, vocab=32000)
TINY = dict(hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, vocab=512)
DTYPES = ("bf16", "fp32")


# ---- the model and the plan ------------------------------------------------------------------
def torch_dtype(name: str):
    import torch
    return {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[name]


def build_model(model: dict, dtype: str = "bf16", seed: int = 0, device: str = "cpu"):
    """A ``LlamaForCausalLM`` with random (seeded, reproducible) weights in ``dtype``, eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=model["hidden"], intermediate_size=model["intermediate"],
                      num_hidden_layers=model["layers"], num_attention_heads=model["heads"],
                      num_key_value_heads=model["kv_heads"], vocab_size=model["vocab"],
                      max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype(dtype))      # built in place: no fp32 copy of a bf16 model
    try:
        with torch.device(device):
            m = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return m.eval()


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def env_info() -> dict:
    import torch
    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "python": platform.python_version(),
            "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "threads": torch.get_num_threads()}
    for mod in ("triton", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            info[mod] = None
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return info


# ---- timing patchc's parts -------------------------------------------------------------------
class PatchcTimers:
    """Wraps patchc's functions to accumulate seconds (and bytes for packing) by part."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.pack_dense_bytes = 0
        self.pack_packed_bytes = 0
        self._undo: list = []

    def _wrap(self, owner, attr: str, part: str, after=None):
        orig = getattr(owner, attr, None)
        if orig is None:
            return
        timers = self

        def wrapped(*a, **k):
            t = time.perf_counter()
            try:
                out = orig(*a, **k)
            finally:
                timers.seconds[part] = timers.seconds.get(part, 0.0) + time.perf_counter() - t
                timers.calls[part] = timers.calls.get(part, 0) + 1
            if after is not None:
                after(a, out)
            return out

        wrapped.__wrapped__ = orig
        setattr(owner, attr, wrapped)
        self._undo.append((owner, attr, orig))

    def _packed(self, args, packed) -> None:
        self.pack_dense_bytes += packed.dense_nbytes()
        self.pack_packed_bytes += packed.nbytes()

    def install(self) -> "PatchcTimers":
        import patchc.backend as backend
        import patchc.codegen.cache as cache
        import patchc.codegen.layout as layout
        import patchc.codegen.runner as runner
        import patchc.runtime as runtime
        self._wrap(backend, "load_plan", "loading")
        self._wrap(cache, "load_module", "loading")
        self._wrap(layout, "plan_dispatch", "cost model")
        self._wrap(layout, "planned_us", "cost model")             # fusion predictions (fuse_siblings)
        self._wrap(runner, "get_kernel", "codegen")
        self._wrap(cache, "render", "render")                    # inside codegen
        self._wrap(runtime.SiteEntry, "repack", "packing", after=self._packed)
        if hasattr(runtime, "GroupEntry"):                       # fused sibling linears pack as one
            self._wrap(runtime.GroupEntry, "repack", "packing", after=self._packed)
        # the CPU reference path's W ⊙ M, built at the first call: from the user's weight, else unpacked
        self._wrap(runtime, "unpack", "reference weight")
        self._wrap(runtime.SiteEntry, "user_reference", "reference weight")
        if hasattr(runtime, "GroupEntry"):
            self._wrap(runtime.GroupEntry, "user_reference", "reference weight")
        return self

    def uninstall(self) -> None:
        for owner, attr, orig in reversed(self._undo):
            setattr(owner, attr, orig)
        self._undo.clear()


def patchc_split(timers: PatchcTimers, records) -> dict:
    """Seconds by part; ``passes (rest)`` is the passes' time outside the timed parts."""
    passes: dict[str, float] = {}
    for r in records:
        for k, v in r.seconds.items():
            passes[k] = passes.get(k, 0.0) + v
    s = timers.seconds
    timed_in_passes = s.get("cost model", 0.0) + s.get("codegen", 0.0) + s.get("packing", 0.0)
    out = {"passes (rest)": max(0.0, sum(passes.values()) - timed_in_passes),
           "cost model": s.get("cost model", 0.0), "codegen": s.get("codegen", 0.0),
           "render": s.get("render", 0.0), "packing": s.get("packing", 0.0), "loading": s.get("loading", 0.0),
           "reference weight": s.get("reference weight", 0.0)}
    out["total"] = sum(v for k, v in out.items() if k != "render")
    return {"split": out, "per_pass": passes, "calls": dict(timers.calls)}


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


def tree_state() -> str:
    """HEAD and a hash of the uncommitted changes to patchc / passes / codegen: which code ran."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        diff = subprocess.run(["git", "diff", "HEAD", "--", "patchc", "passes", "codegen"], cwd=root,
                              capture_output=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    import hashlib
    return f"{head}+{hashlib.sha1(diff).hexdigest()[:8]}" if diff else head


def _entry_weight(e):
    """The (out, in) weight an entry packs: a site's own, a fused group's members concatenated."""
    import torch
    if hasattr(e, "_weights"):                                  # runtime.GroupEntry
        ws = [r() for r in e._weights]
        return None if any(w is None for w in ws) else torch.cat([m.oriented(w) for m, w in zip(e.members, ws)])
    w = e._weight() if hasattr(e, "_weight") else None
    return None if w is None else e.oriented(w)


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
    """(weight, tile mask, row order) of every live, unreleased entry of ``model`` (every model
    when None; a fused group as one)."""
    from patchc import runtime
    ids = None if model is None else {id(p) for p in model.parameters()}
    entries = [e for e in runtime._REGISTRY.values()
               if ids is None or any(id(w) in ids for w in _weights_of(e) if w is not None)]
    fused = {id(e.member) for e in entries if isinstance(e, runtime.FusedMember)}    # packed with their group
    out = []
    for e in entries:
        if isinstance(e, (runtime.SiteEntry, runtime.GroupEntry)) and id(e) not in fused and not e.released:
            w = _entry_weight(e)
            if w is not None:
                out.append((w, e.tile_mask, e.row_order))
    return out


def _weights_of(e) -> list:
    if hasattr(e, "_weights"):
        return [r() for r in e._weights]
    if hasattr(e, "_weight"):
        return [e._weight()]
    return [m() for m in ([e.member._weight] if hasattr(e, "member") else [])]


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
    timers = None
    if spec["backend"] == "patch":
        import patchc
        from patchc.backend import records
        timers = PatchcTimers().install()
        patchc.counters.reset()
        n_records = len(records())
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
    if timers is not None:
        import patchc
        from patchc.codegen.cache import stats
        timers.uninstall()
        recs = records()[n_records:]
        res.update(patchc_split(timers, recs))
        res["graphs"] = len(recs)
        res["decisions"] = {a: sum(d.action == a for r in recs for d in r.decisions)
                            for a in ("hybrid", "dense", "skipped")}
        res["pack_dense_bytes"] = timers.pack_dense_bytes
        res["pack_packed_bytes"] = timers.pack_packed_bytes
        res["kernel_cache"] = dict(stats)
        res["distinct_kernels"] = len({k.key for k in patchc.kernels(compiled)})
        res["patchc_counters"] = dict(patchc.counters)
        res["pack_all"] = pack_all(model)
        res["pack_warm_memory"] = pack_throughput(model=model)
    res["tree"] = tree_state()
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
    return child.run_child("patchc.bench.compile_time", task, spec, env, timeout)


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
def _tile(s: str):
    a, b = (int(v) for v in s.lower().replace("x", ",").split(","))
    return a, b


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 24; --quick: 4)")
    p.add_argument("--quick", action="store_true", help="4 layers: a few minutes")
    p.add_argument("--tiny", action="store_true", help="a tiny model (hidden 128, 2 layers): a smoke run")
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="weights and activations (default bf16)")
    p.add_argument("--seq", type=int, default=32, help="tokens of the input, batch 1 (default 32)")
    p.add_argument("--sparsity", type=float, default=0.35, help="plan target sparsity (default 0.35)")
    p.add_argument("--tile", type=_tile, default=None, help="tile, e.g. 128x128 (default; --tiny: 32x32)")
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
    md = render_markdown(result)
    print(md)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(md)
        Path(args.out).with_suffix(".json").write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rc = child.child_main(argv, {"measure": measure, "plan": lambda spec: make_plan_file(spec, spec["path"])})
    if rc is not None:
        return rc
    p = argparse.ArgumentParser(prog="patchc bench compile-time", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    args.cmdline = "python -m patchc.bench.compile_time " + " ".join(argv)
    return main_args(args)


if __name__ == "__main__":
    sys.exit(main())
