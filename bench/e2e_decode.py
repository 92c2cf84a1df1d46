"""End-to-end decode tokens/s on a GPU: dense ``torch.compile`` vs ``backend="patch"`` (LLaMA-2-7B shapes).

A Llama with LLaMA-2-7B shapes (hidden 4096, MLP 11008, 32 heads, vocab 32000; ``--layers``
of the 32, random bf16 weights) decodes ``--gen`` tokens after a ``--prompt``-token prefill,
at each batch size, with a static KV cache (transformers ``StaticCache``, or ``--impl native``:
a built-in Llama with the same shapes and its own static cache, used when transformers is
missing) so one decode graph serves every step.  The prefill runs eager; the compiled module is
called once per decode step (``generate()`` would not go through it).  Variants:

* ``eager``           the model as it is (no compile)
* ``inductor``        ``torch.compile(model)``
* ``inductor-cg``     ``torch.compile(model, mode="reduce-overhead")`` (CUDA graphs)
* ``patch-cg@S``      ``patchc.compile(model, plan_S, mode="reduce-overhead")``: the patch backend,
                      ``mode`` forwarded to inductor (CUDA graphs), plan = ``magnitude_hybrid`` at S
* ``patch@S``         the same without CUDA graphs

Beside each measurement: the bandwidth bound from the bytes one decode step moves (planned
linears at 1 - 0.4375 f of their dense bytes, f their fraction of 2:4 tiles; the LM head;
the whole static KV cache, read by every step; activations) at the device's datasheet
bandwidth.  Also the GPU memory of the weights, dense and packed, and after
``release_dense=True``.  A global ``--budget`` stops early; results are written after every
measurement to ``e2e_decode.md`` / ``.csv`` / ``.json`` under ``$OUT`` (else ``--out``, else
``bench/results`` of this checkout on a GPU).

    python3 -m bench.e2e_decode --layers 8                 # one GPU call of ~5-6 minutes
    python3 -m bench.e2e_decode --device cpu --tiny        # CPU smoke run of the same logic
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

from .common import TINY, env_info
from .e2e_model import Decoder, _import_torch

LLAMA7B = dict(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000)
SPARSITIES = (0.25, 0.35, 0.45)
BATCHES = (1, 16)
SAVED = 0.4375          # bytes a 2:4 tile saves in fp16/bf16: 1/2 of the values minus 1/16 of metadata
COLUMNS = ["batch", "variant", "sparsity", "frac24", "tokens_per_s", "ms_per_step", "bound_tokens_per_s",
           "of_bound", "speedup_vs_inductor_cg", "step_mb", "compile_s", "cudagraph_skips", "hybrid_sites",
           "triton_calls", "dense_dispatch_calls", "gpu_mem_mb", "error"]


# ---- bytes per step and the bound ------------------------------------------------------------

def planned_linears(model, plan=None) -> list[tuple[int, float]]:
    """(weights, fraction of 2:4 tiles) of every linear a plan covers (f = 0 without a plan)."""
    from patchc.modules import select_linears
    return [(mod.weight.numel(), plan[name].fraction_sparse_tiles() if plan is not None and name in plan else 0.0)
            for name, mod in select_linears(model).items()]


def step_bytes(m: dict, batch: int, max_len: int, linears: list[tuple[int, float]], itemsize: int = 2) -> dict:
    """Bytes one decode step moves: the planned linears at 1 - 0.4375 f of their dense bytes, the
    LM head, the whole static KV cache (every step reads all of it), the embedding rows, the norms
    and the activations (small)."""
    h, i, L, v = m["hidden"], m["intermediate"], m["layers"], m["vocab"]
    kvd = m["kv_heads"] * (h // m["heads"])
    out = {"linears": sum(n * itemsize * (1.0 - SAVED * f) for n, f in linears),
           "lm_head": v * h * itemsize, "embed": batch * h * itemsize, "norms": (2 * L + 1) * h * itemsize,
           "kv_cache": 2 * L * batch * kvd * (max_len + 1) * itemsize,
           "activations": L * batch * (8 * h + 3 * i) * itemsize + batch * v * itemsize}
    out["total"] = sum(out.values())
    tot = sum(n for n, _ in linears)
    out["frac24"] = sum(n * f for n, f in linears) / tot if tot else 0.0
    return out


def bandwidth_gbs(device) -> tuple[float, str]:
    try:
        from patchc.codegen.devices import get_device
        d = get_device("cuda" if str(device).startswith("cuda") else None)
        return float(d.mem_bw_gbs), d.name
    except Exception:  # noqa: BLE001
        return 4800.0, "h200 (assumed)"


# ---- the run ---------------------------------------------------------------------------------
def torch_itemsize(dtype) -> int:
    return _import_torch().empty((), dtype=dtype).element_size()


class _SkipLog:
    """Collects inductor's "skipping cudagraphs due to ..." messages: they go to an artifact logger
    that is off unless TORCH_LOGS asks, so its ``warning`` is wrapped on the logger object."""

    def __init__(self):
        self.msgs: list[str] = []
        self._log = None

    def install(self) -> None:
        try:
            from torch._inductor import cudagraph_utils
            log = cudagraph_utils.cudagraphs_log
        except (ImportError, AttributeError):
            return
        orig = log.warning

        def warning(msg, *a, **k):
            self.msgs.append(str(msg)[:300])
            return orig(msg, *a, **k)
        log.warning = warning
        self._log = log

    def uninstall(self) -> None:
        if self._log is not None:
            del self._log.warning                  # back to the class's method
            self._log = None


def run_order(batches, variants, sparsities) -> list[tuple]:
    """(batch, variant, sparsity) in priority order, so a budget stop keeps the key comparison:
    per batch the first variant and the first patch variant at the sparsity nearest 35 %, then
    that patch variant's other sparsities, then the rest in the order given."""
    runs = []
    for v in variants:
        base, at, sp = v.partition("@")
        sps = ([float(sp)] if sp else list(sparsities)) if at else [None]
        runs += [(b, base, x) for b in batches for x in sps]
    key_sp = min(sparsities, key=lambda x: abs(x - 0.35)) if sparsities else None
    first = variants[0].partition("@")[0]
    patch = next((v.partition("@")[0] for v in variants if v.startswith("patch")), None)
    tier0 = [r for b in batches for r in runs if r[0] == b and (r[1] == first and r[2] in (None, key_sp)
                                                              or r[1] == patch and r[2] == key_sp)]
    tier1 = [r for b in batches for r in runs if r[0] == b and r[1] == patch and r not in tier0]
    return tier0 + tier1 + [r for r in runs if r not in tier0 and r not in tier1]


class Bench:
    def __init__(self, args):
        torch = _import_torch()
        self.args, self.t0, self.rows, self.stopped = args, time.time(), [], ""
        self.device = torch.device(args.device)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
        self.cuda = self.device.type == "cuda"
        self.info = env_info(self.device)
        self.bw, self.bw_name = bandwidth_gbs(self.device)
        self.memory: dict = {}
        self.notes: list[str] = []

    def left(self) -> float:
        return self.args.budget - (time.time() - self.t0)

    def sync(self):
        if self.cuda:
            _import_torch().cuda.synchronize()

    def gpu_mb(self) -> float:
        torch = _import_torch()
        return torch.cuda.memory_allocated() / 2**20 if self.cuda else float("nan")

    def compile_variant(self, model, variant: str, plan):
        torch = _import_torch()
        torch._dynamo.reset()
        inner_eager = self.args.compiler == "eager"
        if variant == "eager":
            return model
        if variant.startswith("inductor"):
            if inner_eager:
                return torch.compile(model, backend="eager")
            return torch.compile(model, mode="reduce-overhead" if variant.endswith("-cg") else None)
        import patchc
        kw = {"inner": "eager"} if inner_eager else {}
        if variant.startswith("patch-cg"):
            kw["mode"] = "reduce-overhead"
        return patchc.compile(model, plan, **kw)

    def measure(self, dec: "Decoder", variant: str, sparsity, plan) -> dict:
        import patchc
        from torch._dynamo.utils import counters
        a = self.args
        cg = "-cg" in variant and self.cuda and a.compiler != "eager"
        r = {"batch": dec.batch, "variant": variant, "sparsity": sparsity}
        b = step_bytes(a.model, dec.batch, dec.max_len, planned_linears(dec.model, plan),
                       torch_itemsize(self.dtype))
        r["frac24"], r["step_mb"] = b["frac24"], b["total"] / 2**20
        r["bound_tokens_per_s"] = dec.batch / (b["total"] / (self.bw * 1e9))
        patchc.counters.reset()
        counters.clear()
        skip = _SkipLog()
        skip.install()
        try:
            t = time.perf_counter()
            step = self.compile_variant(dec.model, variant, plan)
            tok = dec.prefill()
            tok = dec.decode(step, a.warmup, tok, cg)                 # compile, CUDA-graph warm-up + record
            self.sync()
            r["compile_s"] = time.perf_counter() - t
            times = []
            for _ in range(a.repeats):
                tok = dec.prefill()
                self.sync()
                t = time.perf_counter()
                tok = dec.decode(step, a.gen, tok, cg)
                self.sync()
                times.append(time.perf_counter() - t)
            dt = statistics.median(times)
            r["ms_per_step"] = 1e3 * dt / a.gen
            r["tokens_per_s"] = dec.batch * a.gen / dt
            r["of_bound"] = r["tokens_per_s"] / r["bound_tokens_per_s"]
        finally:
            skip.uninstall()
        r["cudagraph_skips"] = int(counters["inductor"].get("cudagraph_skips", 0))
        if skip.msgs:
            r["cudagraph_skip_reasons"] = sorted(set(skip.msgs))[:3]
        c = dict(patchc.counters)
        r["hybrid_sites"] = c.get("sites_rewritten", 0)
        r["triton_calls"] = c.get("triton_calls", 0)
        r["dense_dispatch_calls"] = c.get("dense_dispatch_calls", 0)
        r["gpu_mem_mb"] = self.gpu_mb()
        return r

    def run(self):
        a = self.args
        impl = a.impl
        if impl == "auto":
            try:
                from transformers import StaticCache  # noqa: F401
                impl = "hf"
            except Exception:  # noqa: BLE001
                impl = "native"
                self.notes.append("transformers (StaticCache) not importable: the built-in Llama ran")
        self.impl = impl
        dec = Decoder(impl, a.model, max(a.batches), a.prompt, a.gen, self.device, self.dtype)
        dec.set_batch(a.batches[0], a.model["vocab"], self.dtype)
        model = dec.model
        self.sync()
        from patchc.modules import select_linears
        planned = select_linears(model)
        dense_w = sum(mod.weight.numel() * mod.weight.element_size() for mod in planned.values())
        self.memory["all_params_mb"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        self.memory["planned_linears_dense_mb"] = dense_w / 2**20
        self.memory["gpu_allocated_after_build_mb"] = self.gpu_mb()
        order = run_order(a.batches, a.variants, a.sparsities)
        t = time.perf_counter()
        from .memory import plans_at
        plans = plans_at(model, sorted({sp for _, _, sp in order if sp is not None}),
                         (128, 128) if not a.tiny else (32, 32))
        self.notes.append(f"plans (magnitude_hybrid, per-layer scores once) in {time.perf_counter() - t:.1f} s")
        for bsz, variant, sp in order:
            if self.left() < 0:
                self.stopped = f"budget of {a.budget:.0f} s spent"
                break
            if dec.batch != bsz:
                dec.set_batch(bsz, a.model["vocab"], self.dtype)
            name = f"{variant}@{sp:.0%}" if sp is not None else variant
            try:
                r = self.measure(dec, variant, sp, plans.get(sp) if sp is not None else None)
            except Exception as exc:  # noqa: BLE001 -- record, go on
                traceback.print_exc()
                r = {"batch": bsz, "variant": variant, "sparsity": sp, "error": f"{type(exc).__name__}: {exc}"[:300]}
                if "CUDA error" in str(exc) or "illegal" in str(exc):
                    self.rows.append(r)
                    self.stopped = "CUDA context lost"
                    break
            r["name"] = name
            self.rows.append(r)
            self.finish_row(r)
            print(fmt_row(r), flush=True)
            self.write()
        # GPU memory of the weights with release_dense (last: it frees the dense weights)
        if plans and self.stopped != "CUDA context lost":
            try:
                self.memory.update(self.release_memory(model, plans[min(plans, key=lambda s: abs(s - 0.35))]))
            except Exception as exc:  # noqa: BLE001
                self.memory["release_error"] = f"{type(exc).__name__}: {exc}"[:200]
        self.write()

    def finish_row(self, r):
        ref = next((x for x in self.rows if x.get("batch") == r.get("batch") and x.get("variant") == "inductor-cg"
                    and x.get("tokens_per_s")), None)
        if ref and r.get("tokens_per_s"):
            r["speedup_vs_inductor_cg"] = r["tokens_per_s"] / ref["tokens_per_s"]

    def release_memory(self, model, plan) -> dict:
        torch = _import_torch()
        import patchc
        torch._dynamo.reset()
        if self.cuda:
            torch.cuda.empty_cache()
        before = self.gpu_mb()
        compiled = patchc.compile(model, plan, release_dense=True)
        if self.cuda:
            torch.cuda.empty_cache()
        rows = [r for r in patchc.memory_report(compiled)["entries"] if r["released"]]
        rows = rows or [r for r in patchc.memory_report()["entries"] if r["released"]]   # not called yet
        packed, dense = sum(r["packed_bytes"] for r in rows), sum(r["dense_bytes"] for r in rows)
        return {"release_plan_sparsity": plan.sparsity(), "released_dense_mb": dense / 2**20,
                "released_packed_mb": packed / 2**20, "gpu_allocated_before_release_mb": before,
                "gpu_allocated_after_release_mb": self.gpu_mb()}

    # ---- output ------------------------------------------------------------------------------
    def write(self):
        out = self.args.out
        if not out:
            return
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "e2e_decode.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["name"] + COLUMNS, extrasaction="ignore")
            w.writeheader()
            for r in self.rows:
                w.writerow(r)
        (out / "e2e_decode.json").write_text(json.dumps(self.result(), indent=1, default=str))
        (out / "e2e_decode.md").write_text(render_markdown(self.result()))

    def result(self) -> dict:
        a = self.args
        return {"env": self.info, "impl": getattr(self, "impl", a.impl), "model": a.model, "dtype": a.dtype,
                "prompt": a.prompt, "gen": a.gen, "batches": a.batches, "bandwidth_gbs": self.bw,
                "bandwidth_of": self.bw_name, "compiler": a.compiler, "rows": self.rows, "memory": self.memory,
                "notes": self.notes, "stopped": self.stopped, "elapsed_s": time.time() - self.t0,
                "command": getattr(a, "cmdline", "")}


def fmt_row(r: dict) -> str:
    keys = ("name", "batch", "tokens_per_s", "bound_tokens_per_s", "of_bound", "speedup_vs_inductor_cg",
            "compile_s", "cudagraph_skips", "triton_calls", "error")
    return "  ".join(f"{k}={r[k]:.4g}" if isinstance(r.get(k), float) else f"{k}={r.get(k)}" for k in keys if k in r)


def _g(x, fmt=".1f"):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def render_markdown(res: dict) -> str:
    e, m = res["env"], res["model"]
    lines = ["# End-to-end decode: dense torch.compile vs backend=\"patch\"", "",
             f"- device: {e['device']}; torch {e['torch']}, triton {e.get('triton')}, transformers "
             f"{e.get('transformers')}; python {e['python']}; {e.get('code')}; date {e['date']}",
             f"- model: Llama with LLaMA-2-7B shapes, {m['layers']} of 32 layers (hidden {m['hidden']}, MLP "
             f"{m['intermediate']}, {m['heads']} heads / {m['kv_heads']} KV, vocab {m['vocab']}), random {res['dtype']} "
             f"weights; implementation: {res['impl']}; static KV cache of prompt + gen = "
             f"{res['prompt'] + res['gen']} positions",
             f"- prompt {res['prompt']} tokens (eager prefill), then {res['gen']} greedy decode steps through the "
             f"compiled module; tokens/s = batch x {res['gen']} / decode time (median of the repeats)",
             f"- bound: batch / (bytes per step / {res['bandwidth_gbs']:.0f} GB/s, the {res['bandwidth_of']} datasheet "
             "bandwidth); bytes per step = planned linears at 1 - 0.4375 f of dense + LM head + the whole static "
             "KV cache + embeddings row + norms + activations",
             f"- compiler: {res['compiler']}" + (f"; stopped early: {res['stopped']}" if res["stopped"] else ""),
             *(f"- note: {n}" for n in res["notes"]), "",
             "| batch | variant | 2:4 frac | tokens/s | ms/step | bound tokens/s | of bound | vs inductor-cg | "
             "MB/step | compile+warm-up s | CUDA-graph skips | Triton calls (warm-up) | error |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r.get('batch')} | {r.get('name', r.get('variant'))} | {_g(r.get('frac24'), '.3f')} | "
                     f"{_g(r.get('tokens_per_s'))} | {_g(r.get('ms_per_step'), '.2f')} | "
                     f"{_g(r.get('bound_tokens_per_s'))} | {_g(r.get('of_bound'), '.2f')} | "
                     f"{_g(r.get('speedup_vs_inductor_cg'), '.3f')} | {_g(r.get('step_mb'), '.0f')} | "
                     f"{_g(r.get('compile_s'))} | {r.get('cudagraph_skips', '-')} | {r.get('triton_calls', '-')} | "
                     f"{r.get('error', '')} |")
    mem = res["memory"]
    if mem:
        labels = {"all_params_mb": "all parameters (dense)", "planned_linears_dense_mb": "planned linears, dense",
                  "gpu_allocated_after_build_mb": "allocated after building the model (weights + static KV cache)",
                  "release_plan_sparsity": "release_dense plan sparsity",
                  "released_dense_mb": "released linears, dense bytes", "released_packed_mb": "their packed bytes",
                  "gpu_allocated_before_release_mb": "allocated before patchc.compile(..., release_dense=True) "
                                                     "(dense weights + every plan's packed copies + cache)",
                  "gpu_allocated_after_release_mb": "allocated after it"}
        lines += ["", "## GPU memory of the weights (MiB)", ""]
        lines += [f"- {labels.get(k, k)}: {_g(v, '.3f' if 'sparsity' in k else ',.1f') if isinstance(v, float) else v}"
                  for k, v in mem.items()]
    skips = sorted({s for r in res["rows"] for s in r.get("cudagraph_skip_reasons", [])})
    if skips:
        lines += ["", "## CUDA-graph skip messages", ""] + [f"- {s}" for s in skips]
    lines += ["", "## Reproduce", "", "```", res.get("command", ""), "```", ""]
    return "\n".join(lines)


def default_out(device: str):
    if os.environ.get("OUT"):
        return os.environ["OUT"]
    repo = Path(__file__).resolve().parents[2]
    if device.startswith("cuda") and (repo / "bench").is_dir():
        return str(repo / "bench" / "results")
    return None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cuda", help="cuda (default); cpu: a smoke run of the logic (with --tiny)")
    p.add_argument("--tiny", action="store_true", help="a tiny Llama (hidden 128, 2 layers), prompt 16, gen 8")
    p.add_argument("--layers", type=int, default=8, help="layers of the 32 (default 8: fits one ~6 minute call)")
    p.add_argument("--batches", type=lambda s: [int(v) for v in s.split(",")], default=list(BATCHES),
                   help="batch sizes (default 1,16)")
    p.add_argument("--sparsities", type=lambda s: [float(v) for v in s.split(",")], default=list(SPARSITIES),
                   help="plan sparsities (default 0.25,0.35,0.45)")
    p.add_argument("--variants", type=lambda s: s.split(","),
                   default=["inductor-cg", "patch-cg@", "inductor", "patch@0.35"],
                   help="eager, inductor, inductor-cg, patch@S, patch-cg@S ('@' alone: every --sparsities); "
                        "default inductor-cg,patch-cg@,inductor,patch@0.35")
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 128; --tiny 16)")
    p.add_argument("--gen", type=int, default=None, help="generated tokens (default 128; --tiny 8)")
    p.add_argument("--warmup", type=int, default=3, help="decode steps of warm-up (compile, CUDA-graph record)")
    p.add_argument("--repeats", type=int, default=2, help="timed decodes of --gen steps, median (default 2)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--impl", choices=("auto", "hf", "native"), default="auto",
                   help="transformers LlamaForCausalLM + StaticCache (hf), the built-in Llama (native), or hf "
                        "when transformers is importable (auto, default)")
    p.add_argument("--compiler", choices=("inductor", "eager"), default="inductor",
                   help="inductor (default); eager: backend='eager' / inner='eager' (fast CPU smoke runs)")
    p.add_argument("--budget", type=float, default=300.0, help="seconds for the measurements (default 300)")
    p.add_argument("--out", default=None, help="output folder (default $OUT, else bench/results on a GPU)")


def main_args(args) -> int:
    torch = _import_torch()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu --tiny for a smoke run", file=sys.stderr)
        return 2
    args.model = dict(TINY if args.tiny else LLAMA7B)
    if not args.tiny:
        args.model["layers"] = args.layers
    args.prompt = args.prompt or (16 if args.tiny else 128)
    args.gen = args.gen or (8 if args.tiny else 128)
    args.out = args.out or default_out(args.device)
    b = Bench(args)
    print(b.info, flush=True)
    try:
        b.run()
    except KeyboardInterrupt:
        b.stopped = "interrupted"
    finally:
        b.write()
    print(render_markdown(b.result()))
    if args.out:
        print(f"wrote {Path(args.out) / 'e2e_decode.md'}")
    return 0 if any(r.get("tokens_per_s") for r in b.rows) else 1


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="patchc bench e2e-decode", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    args.cmdline = "python3 -m bench.e2e_decode " + " ".join(argv)
    return main_args(args)


if __name__ == "__main__":
    sys.exit(main())
