"""Memory of mask learning, in bytes per planned linear weight (B/w), and what it means at 7B-8B.

    python bench/learn_memory.py                       # every row (~10 min on 2 cores)
    python bench/learn_memory.py --quick               # bf16 weights only
    python bench/learn_memory.py --baseline old.json   # add a previous run's rows as "before"

Measured on a ``LlamaForCausalLM`` built from a config (hidden 512, MLP 1408, 4 layers, 8 heads,
vocabulary 32 000; 12.85 M planned weights), batch 1 × 128 tokens, 3 steps, each row in a fresh
process (2-rank rows: two gloo processes with FSDP2).  Per row:

- ``state_bpw``: this rank's learning state — the logits and their two Adam moments — counted
  from the tensors (exact); ``fixed_bpw``: the mask data that does not learn (tile mode's 2:4
  pattern per group of 4, the per-tile facts).
- ``peak_bpw_above_model``: the peak resident memory (VmHWM) of the rank during learning minus
  its resident memory with the model loaded, after one plain forward + backward of the same
  shape (the runtime's one-time set-up of kernels for that shape is not learning memory).
  ``MALLOC_MMAP_THRESHOLD_=65536`` makes freed tensors leave the process at once, so the reading
  follows the live tensors.  On 2 ranks each rank loads the whole model before ``fully_shard``,
  which then frees the other rank's half of the blocks' weights (1 B/w in bf16): a 2-rank row
  is what the rank holds above the whole model, that saving included.
- ``plain``: forward + backward with every weight requiring grad (full fine-tuning, no optimizer).
- ``knobs``: ``none`` (defaults), ``memory`` (``grad_checkpointing`` + ``recompute_masks``).

``layer_transient`` rows: peak live tensor bytes, per weight of the layer, while one masked
linear (4096 × 1024, 128 tokens) runs forward and backward — what rebuilding one layer's mask
costs on top of the state (counted with a torch dispatch mode, no allocator in between).

The projection (``learn_memory_report.py``) adds, per rank: the model's weights (bf16) over the ranks, the
measured state and fixed B/w over the ranks (FSDP shards them), the layer transient of the
largest linear, FSDP's gathered blocks, the block-checkpointed activations and the loss of a
4096-token micro-batch, and a 3 GiB reserve (CUDA context, allocator) — every term is printed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time

LLAMA = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=8, vocab_size=32000, max_position_embeddings=256)
TOKENS, STEPS = 128, 3
KNOBS = {"none": {}, "memory": {"grad_checkpointing": True, "recompute_masks": True}}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


# ---- one measurement (a fresh process, or one of two ranks) ---------------------------------------
def _measure(spec: dict, rank: int = 0, world: int = 1) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    dtype = getattr(torch, spec["dtype"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA)).to(dtype).eval()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, LLAMA["vocab_size"], (1, TOKENS), generator=g) for _ in range(STEPS * world)]
    from patchc.learn.calib import default_linears
    planned = sum(m.weight.numel() for m in default_linears(model).values())
    import torch.distributed.checkpoint  # noqa: F401  (imported before the baseline, like the library)
    import patchc.learn.trainer  # noqa: F401
    if world > 1:
        import torch.distributed.fsdp  # noqa: F401
    for p in model.parameters():          # warm-up: one plain step of this shape
        p.requires_grad_(True)
    model(input_ids=batches[0], labels=batches[0], use_cache=False).loss.backward()
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    base = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                      # reset VmHWM (Linux >= 4.0)
    times, state = [], {}
    t0 = time.perf_counter()
    if spec["mode"] == "plain":
        model.train()
        for p in model.parameters():
            p.requires_grad_(True)
        for b in batches[:STEPS]:
            t = time.perf_counter()
            model(input_ids=b, labels=b, use_cache=False).loss.backward()
            model.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t)
    else:
        from patchc.learn import LearnConfig, learn_masks

        def inspect(step, rec):
            times.append(rec["seconds"])
            if step == 0:
                state.update(_state_bytes(model))
        kw = dict(mode=spec["mode"], tile=(128, 128), steps=STEPS, progress=False, **KNOBS[spec["knobs"]])
        if spec["state_dtype"] != "float32":
            kw["state_dtype"] = spec["state_dtype"]
        if world > 1:
            kw["strategy"] = "fsdp"
        learn_masks(model, batches, LearnConfig(**kw), callback=inspect)
    peak = _status("VmHWM") - base
    return {**spec, "ranks": world, "rank": rank, "planned_weights": planned, "tokens": TOKENS,
            "peak_bpw_above_model": round(peak / planned, 3),
            "state_bpw": round(state.get("state", 0) / planned, 3), "fixed_bpw": round(state.get("fixed", 0) / planned, 3),
            "step_s_median": round(sorted(times)[len(times) // 2], 3), "wall_s": round(time.perf_counter() - t0, 1)}


def _state_bytes(model) -> dict:
    """Bytes this rank holds of the logits (+ 2 Adam moments each) and of the fixed mask data."""
    state = fixed = 0
    for name, p in model.named_parameters():
        if ".patch_mask." not in name:
            continue
        local = p.to_local() if hasattr(p, "to_local") else p
        n = local.numel() * local.element_size()
        if p.requires_grad:
            state += 3 * n
        else:
            fixed += n
    for name, b in model.named_buffers():
        if ".patch_mask." in name:
            fixed += b.numel() * b.element_size()
    return {"state": state, "fixed": fixed}


def _rank_main(rank: int, world: int, port: int, spec: dict, out: str) -> None:
    import torch.distributed as dist
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        row = _measure(spec, rank, world)
        with open(f"{out}.{rank}", "w") as f:
            json.dump(row, f)
    finally:
        dist.destroy_process_group()


def _child(spec: dict) -> dict:
    if spec["ranks"] == 1:
        return _measure(spec)
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "row")
        mp.spawn(_rank_main, args=(spec["ranks"], port, spec, out), nprocs=spec["ranks"], join=True)
        rows = [json.load(open(f"{out}.{r}")) for r in range(spec["ranks"])]
    worst = max(rows, key=lambda r: r["peak_bpw_above_model"])
    return {**worst, "rank": "max", "per_rank_peak_bpw": [r["peak_bpw_above_model"] for r in rows]}


def run_row(spec: dict) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)], env=env,
                         capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"row {spec} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---- the transient of one layer ----------------------------------------------------------------
def layer_transient(mode: str, state_dtype: str, recompute: bool, n: int = 4096, k: int = 1024) -> dict:
    """Peak live tensor bytes per layer weight, above the layer's learning state, through one
    forward + backward of a masked n×k bf16 linear on 128 tokens."""
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from patchc.learn.masking import pattern_index
    from patchc.learn.state import MaskState, StepContext
    from patchc.prune import mask24_from_scores

    class Live(TorchDispatchMode):
        def __init__(self, skip):
            super().__init__()
            self.skip, self.live, self.cur, self.peak = skip, {}, 0, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    st = t.untyped_storage()
                    key = st.data_ptr()
                    if key and key not in self.live and key not in self.skip:
                        self.live[key] = st.nbytes()
                        self.cur += st.nbytes()
                        self.peak = max(self.peak, self.cur)
                        weakref.finalize(st, self._free, key)
            return out

        def _free(self, key):
            self.cur -= self.live.pop(key, 0)

    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n, bias=False).to(torch.bfloat16).requires_grad_(False)
    dt = getattr(torch, state_dtype)
    pat = torch.randn(6, n, k // 4) * 0.03 if mode == "joint" else None
    st = MaskState("l", lin, (128, 128), mode, torch.randn(n // 128, k // 128) * 0.1, pat,
                   pattern_index(mask24_from_scores(lin.weight.float().abs())).to(torch.uint8), dt)
    st.ctx = StepContext(torch.Generator().manual_seed(0), recompute=recompute)
    st.ctx.sched, st.ctx.collect = {"tau": 1.0, "kappa_tile": 100.0, "kappa_24": 100.0}, True
    x = torch.randn(1, 128, k, dtype=torch.bfloat16, requires_grad=True)
    skip = {t.untyped_storage().data_ptr() for t in [*st.parameters(), *st.buffers(), lin.weight, x]}
    with Live(skip) as live:
        out = st.linear(lin, x)
        pruned, mag = st.ctx.stats[0][:2]      # (pruned, ‖W ⊙ M‖², penalty-weighted pruned)
        (out.float().square().mean() + pruned * 1e-6 + mag * 1e-9).backward()
        del out, pruned, mag
        st.ctx.stats.clear()
        grads = sum(p.grad.numel() * p.grad.element_size() for p in st.parameters() if p.grad is not None)
    # the logits' gradient is the state's own (freed by the update in a run); x's and the output
    # belong to the activations
    act = 2 * x.numel() * 2 + n * 128 * 2 * 2
    return {"mode": mode, "state_dtype": state_dtype, "recompute": recompute, "shape": [n, k],
            "transient_bpw_of_layer": round((live.peak - act) / (n * k), 2), "grad_bpw_of_layer": round(grads / (n * k), 2)}


def _report():
    try:
        from . import learn_memory_report as report
    except ImportError:             # run as a file: python bench/learn_memory.py
        import learn_memory_report as report
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="bf16 weights only")
    ap.add_argument("--out", default=os.path.join(RESULTS, "learn_memory"),
                    help="path without extension of the .json and .md (default: bench/results/learn_memory)")
    ap.add_argument("--baseline", default=None, help="a JSON of rows from a previous implementation to show as 'before'")
    ap.add_argument("--baseline-code", default=None, help="what the baseline ran (a commit), for the report")
    ap.add_argument("--rows-only", action="store_true", help="measure 1-rank rows without new options (baselines)")
    ap.add_argument("--render", action="store_true", help="only rewrite the report from the JSON of --out")
    ap.add_argument("--child", default=None, help="(internal) measure one row given as JSON")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return 0
    report = _report()
    if args.render:
        with open(args.out + ".json") as f:
            res = json.load(f)
        res.setdefault("config", {"llama": LLAMA, "tokens": TOKENS, "steps": STEPS, "knobs": KNOBS})
        report.analyse(res)
        _write(args.out, res, report)
        return 0
    specs = []
    for dtype in (("bfloat16",) if args.quick else ("float32", "bfloat16")):
        specs.append({"mode": "plain", "dtype": dtype, "state_dtype": "float32", "knobs": "none", "ranks": 1})
        for mode in ("tile", "joint"):
            for sdt in (("float32",) if args.rows_only else ("float32", "bfloat16")):
                for knobs in (("none",) if args.rows_only else ("none", "memory")):
                    specs.append({"mode": mode, "dtype": dtype, "state_dtype": sdt, "knobs": knobs, "ranks": 1})
    if not args.rows_only:
        for mode in ("tile", "joint"):
            for sdt in ("float32", "bfloat16"):
                specs.append({"mode": mode, "dtype": "bfloat16", "state_dtype": sdt, "knobs": "memory", "ranks": 2})
    rows = []
    for spec in specs:
        row = run_row(spec)
        rows.append(row)
        print(f"{spec}: state {row['state_bpw']:.2f} B/w, peak above the model {row['peak_bpw_above_model']:.2f} B/w "
              f"({row['wall_s']} s)", flush=True)
    if args.rows_only:
        with open(args.out + ".json", "w") as f:
            json.dump(rows, f, indent=1)
        return 0
    trans = [layer_transient(m, s, rc) for m in ("tile", "joint") for s in ("float32", "bfloat16")
             for rc in ((False, True) if m == "joint" else (False,))]
    res = {"rows": rows, "layer_transient": trans,
           "config": {"llama": LLAMA, "tokens": TOKENS, "steps": STEPS, "knobs": KNOBS},
           "finished": datetime.datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
           "load": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    import torch
    res["torch"] = torch.__version__
    if args.baseline:
        with open(args.baseline) as f:
            res["before"] = json.load(f)
        res["before_code"] = args.baseline_code
    report.analyse(res)
    _write(args.out, res, report)
    return 0


def _write(out: str, res: dict, report) -> None:
    with open(out + ".json", "w") as f:
        json.dump(res, f, indent=1)
    with open(out + ".md", "w") as f:
        f.write(report.render(res))
    print("\n".join(res["targets"]))
    print(f"wrote {out}.json and .md")


if __name__ == "__main__":
    sys.exit(main())
