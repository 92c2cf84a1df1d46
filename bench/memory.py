"""Memory: bytes of the packed model vs dense, and resident memory before / after compile.

Two parts, on the compile-time benchmark's Llama-style model (random weights; ``--layers``):

1. **bytes** (one process): plans at 25 / 35 / 45 % (``magnitude_hybrid``, per-layer work done
   once for the three targets); for bf16/fp16 and fp32 the bytes of the planned linears dense,
   packed by the format's formula (``patchc.cliutil.packed_bytes_table``, what ``patchc inspect``
   prints) and packed for real (``PackedWeight.nbytes()``: values + metadata + index arrays), and
   the whole model (embeddings, norms and the LM head stay dense).
2. **resident memory** (one fresh process per mode): RSS (``VmRSS``) after building the model,
   after compiling and after the first and second forward, for the string backend
   (``torch.compile(model, backend="patch")``: the user keeps the dense weights) and
   ``patchc.compile(model, plan, release_dense=True)`` (dense weights freed, packed kept), plus
   plain eager; then after deleting the model and the compiled model (``torch._dynamo.reset()``,
   ``gc.collect()``): what patchc made for them must be gone with them.  Freed CPU memory may stay
   in the allocator's free lists instead of returning to the OS, so ``malloc_trim(0)`` (glibc,
   through ctypes) runs before every reading.  The inner backend is eager by default
   (``--inner inductor`` to include inductor's own memory).  What patchc holds comes from
   ``patchc.memory_report``.

    patchc bench memory --out bench/results/memory.md
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import sys
import tempfile
import time
from pathlib import Path

from patchc.cliutil import parse_tile

from . import common
from .common import MODEL, TINY, build_model, env_info

TARGETS = (0.25, 0.35, 0.45)
MODES = ("eager", "string", "release")


# ---- resident memory -------------------------------------------------------------------------
def malloc_trim() -> bool:
    """Return freed heap memory to the OS (glibc only); False where unavailable."""
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def rss_mib(trim: bool = True) -> float:
    """Resident set size of this process in MiB (``/proc/self/status`` VmRSS; psutil elsewhere)."""
    if trim:
        gc.collect()
        malloc_trim()
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import psutil
    return psutil.Process().memory_info().rss / 2**20


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a stride-0 view of one zero counts 1 element)."""
    seen, total = set(), 0
    for t in tensors:
        st = t.untyped_storage()
        if st.data_ptr() in seen:
            continue
        seen.add(st.data_ptr())
        total += st.nbytes()
    return total


def runtime_bytes(compiled=None) -> dict:
    """Bytes patchc holds for ``compiled`` (every compiled model when None), from
    ``patchc.memory_report``: packed weights, the reference path's masked copies (W ⊙ M), the fused
    groups' concatenated masks, and the cached mask files' masks."""
    import patchc
    rep = patchc.memory_report(compiled)
    t = rep["total"]
    return {"packed": t["packed_bytes"], "reference_copies": t["masked_copy_bytes"],
            "packed_weights": sum(1 for r in rep["entries"] if r["packed_bytes"]),
            "group_mask_bytes": t["mask_bytes"], "plan_mask_bytes": rep["mask_files"], "entries": len(rep["entries"])}


def measure_rss(spec: dict) -> dict:
    """(child) RSS at each step for one mode: ``eager``, ``string`` or ``release``."""
    import torch
    mode = spec["mode"]
    out = {"mode": mode, "steps": {}, "malloc_trim": malloc_trim()}
    steps = out["steps"]
    steps["start"] = rss_mib()
    model = build_model(spec["model"], spec["dtype"], spec.get("seed", 0))
    steps["model built"] = rss_mib()
    out["param_bytes_before"] = storage_bytes(model.parameters())
    ids = torch.randint(0, spec["model"]["vocab"], (1, spec["seq"]), generator=torch.Generator().manual_seed(1))
    t = time.perf_counter()
    if mode == "eager":
        compiled = model
    elif mode == "string":
        compiled = torch.compile(model, backend="patch", options={"plan": spec["plan"], "inner": spec["inner"]})
    else:
        import patchc
        compiled = patchc.compile(model, spec["plan"], inner=spec["inner"], release_dense=True)
    steps["compiled (lazy: release_dense packs here)"] = rss_mib()
    with torch.inference_mode():
        compiled(ids)
        out["first_call_s"] = time.perf_counter() - t
        steps["first forward"] = rss_mib()
        t = time.perf_counter()
        compiled(ids)
        out["forward_s"] = time.perf_counter() - t
        steps["second forward"] = rss_mib()
    out["param_bytes_after"] = storage_bytes(model.parameters())
    if mode != "eager":
        out.update(runtime_bytes(compiled))
    import patchc
    del compiled, model
    torch._dynamo.reset()
    steps["model and compiled model deleted (dynamo reset)"] = rss_mib()
    out["entries_after_delete"] = len(patchc.memory_report()["entries"])
    try:
        with open("/proc/self/status") as f:
            out["peak_mib"] = next(int(ln.split()[1]) / 1024 for ln in f if ln.startswith("VmHWM:"))
    except (OSError, StopIteration):
        pass
    return out


# ---- bytes of the packed model ---------------------------------------------------------------
def plans_at(model, targets, tile):
    """``{target: MaskPlan}`` by magnitude_hybrid, the per-layer scores computed once."""
    from patchc.modules import fingerprint, oriented_weight, select_linears
    from patchc.plan import MaskPlan
    from patchc.prune import mask24_from_scores, select_sparse_tiles, tile_errors, tile_sizes
    from patchc.types import sparse_allowed
    mods = select_linears(model)
    m24, costs, sizes, allowed = {}, {}, {}, {}
    for name, m in mods.items():
        w = oriented_weight(m).detach()
        m24[name] = mask24_from_scores(w.abs().float())          # on the weight's device
        costs[name] = tile_errors(w, m24[name], tile)
        sizes[name] = tile_sizes(tuple(w.shape), tile)
        allowed[name] = sparse_allowed(tile, tuple(w.shape))
    out = {}
    for t in targets:
        kinds = select_sparse_tiles(costs, sizes, allowed, t)
        out[t] = MaskPlan({n: _tile_mask(tile, kinds[n], m24[n]) for n in mods},
                          {"tile": list(tile), "method": "magnitude-hybrid", "target_sparsity": t,
                           "fingerprint": fingerprint(model, mods)})
    return out


def _tile_mask(tile, kind, mask24):
    """``TileMask.from_kinds`` with the per-weight combination done where ``mask24`` lives (a GPU
    makes light work of a 7 B model's masks; TileMask keeps its copy on the CPU)."""
    import torch
    from patchc.types import TileMask
    (tn, tk), (n, k) = tile, mask24.shape
    per = kind.to(mask24.device).repeat_interleave(tn, 0)[:n].repeat_interleave(tk, 1)[:, :k].bool()
    return TileMask(tile, kind, torch.where(per, mask24.bool(), torch.ones((), dtype=torch.bool, device=per.device)))


def measure_bytes(spec: dict) -> dict:
    """(child) Dense vs packed bytes for each target sparsity and dtype; saves the 35 % plan."""
    import torch
    from patchc.cliutil import packed_bytes_table
    from patchc.modules import oriented_weight
    from patchc.packing import pack
    model = build_model(spec["model"], spec["dtype"], spec.get("seed", 0))
    tile = tuple(spec["tile"])
    t = time.perf_counter()
    plans = plans_at(model, spec["targets"], tile)
    plan_s = time.perf_counter() - t
    mods = dict(model.named_modules())
    total_params = sum(p.numel() for p in model.parameters())
    rows = []
    for target, plan in ({} if spec.get("no_pack") else plans).items():
        planned = sum(m.mask.numel() for m in plan.values())
        for label, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            isz = torch.empty((), dtype=dt).element_size()
            formula, dense = packed_bytes_table(plan, dt)
            actual = index = 0
            t = time.perf_counter()
            for name, tm in plan.items():
                p = pack(oriented_weight(mods[name]).detach().to(dt), tm)
                actual += p.nbytes()
                index += sum(getattr(p, k).numel() * 4 for k in ("rows", "kidx"))     # the index arrays
                del p
            pack_s = time.perf_counter() - t
            rest = (total_params - planned) * isz
            rows.append({"target": target, "sparsity": plan.sparsity(), "dtype": label,
                         "frac_sparse": sum(m.fraction_sparse_tiles() * m.mask.numel() for m in plan.values()) / planned,
                         "linear_dense": dense, "linear_packed_formula": formula - index, "linear_packed_actual": actual,
                         "index_bytes": index, "model_dense": total_params * isz,
                         "model_packed": rest + actual, "pack_s": pack_s})
    if spec.get("plan_out"):
        plans[min(plans, key=lambda t: abs(t - 0.35))].save(spec["plan_out"])
    return {"rows": rows, "plan_s": plan_s, "params": total_params,
            "planned_params": sum(m.mask.numel() for m in next(iter(plans.values())).values())}


# ---- orchestration ---------------------------------------------------------------------------
def run_child(task: str, spec: dict, timeout: float = 3600) -> dict:
    return common.run_child("memory", task, spec, None, timeout)


def run(args) -> dict:
    model = dict(TINY if args.tiny else MODEL)
    if args.layers:
        model["layers"] = args.layers
    tile = tuple(args.tile or ((32, 32) if args.tiny else (128, 128)))
    work = Path(tempfile.mkdtemp(prefix="patchc-bench-mem-"))
    plan_path = str(work / "plan35.safetensors")
    say = (lambda *a: print(*a, flush=True)) if not args.quiet else (lambda *a: None)
    base = {"model": model, "dtype": args.dtype, "seed": 0, "seq": args.seq, "inner": args.inner}
    t0 = time.perf_counter()
    nbytes = None
    if "bytes" in args.parts:
        say(f"bytes: plans at {', '.join(f'{t:.0%}' for t in args.targets)} on {model} ...")
        nbytes = run_child("bytes", {**base, "tile": list(tile), "targets": list(args.targets),
                                     "plan_out": plan_path})
    if args.plan:
        plan_path = args.plan
    elif nbytes is None and "rss" in args.parts:
        say("planning (35 %) for the RSS runs ...")
        run_child("bytes", {**base, "tile": list(tile), "targets": [0.35], "plan_out": plan_path, "no_pack": True})
    rss = []
    for mode in (args.modes if "rss" in args.parts else []):
        say(f"resident memory: {mode} ...")
        rss.append(run_child("rss", {**base, "mode": mode, "plan": plan_path}))
    import shutil
    shutil.rmtree(work, ignore_errors=True)
    return {"env": env_info(), "model": model, "dtype": args.dtype, "tile": list(tile), "seq": args.seq,
            "inner": args.inner, "bytes": nbytes, "rss": rss, "wall_s": time.perf_counter() - t0,
            "command": getattr(args, "cmdline", "")}


def _mib(b) -> str:
    return f"{b / 2**20:,.1f}"


def render_markdown(r: dict) -> str:
    m, b, env = r["model"], r["bytes"], r["env"]
    lines = ["# Memory: packed vs dense bytes, resident memory before / after compile", "",
             f"- {env['date']}; {env['cpu']}, {env['cores']} cores; torch {env['torch']}, "
             f"transformers {env.get('transformers')}",
             f"- model: LlamaForCausalLM from a config, random weights, {m['layers']} layers, hidden {m['hidden']}, "
             f"MLP {m['intermediate']}, vocab {m['vocab']}"
             + (f": {b['params'] / 1e9:.3f} B parameters, {b['planned_params'] / 1e9:.3f} B in the planned "
                "linears (the LM head and the embeddings stay dense)" if b else ""),
             f"- plans: magnitude_hybrid, tile {r['tile'][0]}x{r['tile'][1]}", ""]
    if b:
        lines += ["## Bytes (MiB)", "",
                  "`formula`: what `patchc inspect` prints (values + 2-bit metadata; the index arrays left out). "
                  "`actual`: `PackedWeight.nbytes()` summed over the packed linears (index arrays included).", "",
                  "| target | sparsity | 2:4 fraction | dtype | linears dense | packed (formula) | packed (actual) | "
                  "packed / dense | index arrays | model dense | model packed | model ratio |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for x in b["rows"]:
            lines.append(f"| {x['target']:.0%} | {x['sparsity']:.4f} | {x['frac_sparse']:.3f} | {x['dtype']} | "
                         f"{_mib(x['linear_dense'])} | {_mib(x['linear_packed_formula'])} | "
                         f"{_mib(x['linear_packed_actual'])} | {x['linear_packed_actual'] / x['linear_dense']:.4f} | "
                         f"{x['index_bytes'] / 2**10:,.0f} KiB | {_mib(x['model_dense'])} | "
                         f"{_mib(x['model_packed'])} | {x['model_packed'] / x['model_dense']:.4f} |")
        lines += ["", "Packed / dense of the linears is 1 - 0.4375 f in bf16/fp16 and 1 - 0.46875 f in fp32 "
                  "(the 2-bit metadata is 1/16 resp. 1/32 of a tile's dense bytes), f = the 2:4 fraction.", ""]
    if r["rss"]:
        lines += [f"## Resident memory (MiB, VmRSS after malloc_trim), {r['dtype']}, inner={r['inner']}, "
                  f"input 1 x {r['seq']} tokens", "",
                  "glibc keeps freed memory in its free lists unless asked: `malloc_trim(0)` (ctypes) runs before "
                  "every reading, so the numbers are what the process holds.", ""]
        steps = list(dict.fromkeys(s for x in r["rss"] for s in x["steps"]))
        lines += ["| step | " + " | ".join(x["mode"] for x in r["rss"]) + " |", "|---|" + "---|" * len(r["rss"])]
        for st in steps:
            lines.append(f"| {st} | " + " | ".join(f"{x['steps'].get(st, float('nan')):,.0f}" for x in r["rss"]) + " |")
        extra = (("peak (VmHWM)", lambda x: f"{x.get('peak_mib', float('nan')):,.0f}"),
                 ("parameter storage before", lambda x: _mib(x["param_bytes_before"])),
                 ("parameter storage after", lambda x: _mib(x["param_bytes_after"])),
                 ("patchc packed weights", lambda x: _mib(x.get("packed", 0))),
                 ("reference-path masked copies (W ⊙ M)", lambda x: _mib(x.get("reference_copies", 0))),
                 ("plan masks held (bits; bool once unpacked)", lambda x: _mib(x.get("plan_mask_bytes", 0))),
                 ("fused groups' concatenated masks", lambda x: _mib(x.get("group_mask_bytes", 0))),
                 ("patchc entries alive after the delete", lambda x: str(x.get("entries_after_delete", "-"))),
                 ("compile + first forward (s)", lambda x: f"{x['first_call_s']:.1f}"),
                 ("steady forward (s)", lambda x: f"{x['forward_s']:.2f}"))
        for label, f in extra:
            lines.append(f"| {label} | " + " | ".join(f(x) for x in r["rss"]) + " |")
        lines += ["", "- eager: the model, not compiled; string: `torch.compile(model, backend=\"patch\", "
                  "options={\"plan\": file})` (the user's dense weights stay); release: `patchc.compile(model, "
                  "plan, release_dense=True)` (each planned weight is packed and its dense storage replaced by a "
                  "stride-0 view of one zero, in the `patchc.compile` call itself)."]
    lines += reading(r)
    lines += [f"- whole benchmark {r['wall_s'] / 60:.1f} min", "", "## Reproduce", "", "```",
              r.get("command", ""), "```", ""]
    return "\n".join(lines)


def reading(r: dict) -> list[str]:
    """What the RSS table says, computed from it."""
    by = {x["mode"]: x for x in r["rss"]}
    out = []
    if {"eager", "string", "release"} <= set(by):
        e, s_, rl = (by[m]["steps"] for m in ("eager", "string", "release"))
        last = "second forward"
        out += ["", "## Reading", "",
                f"- The string backend ends at {s_[last]:,.0f} MiB vs {e[last]:,.0f} MiB eager: the user's dense "
                f"weights stay, plus the packed weights ({_mib(by['string']['packed'])} MiB), the CPU reference "
                f"path's masked copies ({_mib(by['string']['reference_copies'])} MiB) and the plan's masks "
                f"({_mib(by['string'].get('plan_mask_bytes', 0))} MiB in the backend's plan cache: the file's bits, "
                f"1/8 byte per planned weight, plus 1 byte where something unpacked them) and "
                f"{_mib(by['string'].get('group_mask_bytes', 0))} MiB in the fused groups' concatenated masks.",
                f"- release_dense frees {_mib(by['release']['param_bytes_before'] - by['release']['param_bytes_after'])}"
                f" MiB of parameter storage and ends at {rl[last]:,.0f} MiB: packed weights "
                f"({_mib(by['release']['packed'])} MiB) + the plan's masks, no masked copies "
                f"({_mib(by['release']['reference_copies'])} MiB; a released site unpacks on every call)."]
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 24)")
    p.add_argument("--tiny", action="store_true", help="a tiny model: a smoke run")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="model dtype for the RSS runs")
    p.add_argument("--targets", type=lambda s: [float(v) for v in s.split(",")], default=list(TARGETS),
                   help="plan sparsities (default 0.25,0.35,0.45)")
    p.add_argument("--tile", type=parse_tile, default=None, help="tile (default 128x128; --tiny: 32x32)")
    p.add_argument("--seq", type=int, default=32, help="input tokens, batch 1 (default 32)")
    p.add_argument("--inner", choices=("eager", "inductor"), default="eager",
                   help="what runs the rest of the graph in the RSS runs (default eager)")
    p.add_argument("--modes", type=lambda s: s.split(","), default=list(MODES),
                   help="RSS runs among eager,string,release (default all)")
    p.add_argument("--parts", type=lambda s: s.split(","), default=["bytes", "rss"],
                   help="bytes,rss (default both)")
    p.add_argument("--plan", default=None, help="mask file for the RSS runs (default: the 35 %% plan made here)")
    p.add_argument("--out", default=None, help="write the markdown report there (and .json beside it)")
    p.add_argument("--quiet", action="store_true")


def main_args(args) -> int:
    bad = [m for m in args.modes if m not in MODES] + [p for p in args.parts if p not in ("bytes", "rss")]
    if bad:
        raise ValueError(f"unknown mode(s) / part(s) {bad}; modes: {list(MODES)}, parts: bytes, rss")
    result = run(args)
    common.write_report(args.out, render_markdown(result), result)
    return 0


def main(argv=None) -> int:
    return common.bench_main(argv, "memory", __doc__, {"bytes": measure_bytes, "rss": measure_rss}, add_arguments,
                             main_args)


if __name__ == "__main__":
    sys.exit(main())
