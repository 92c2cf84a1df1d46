"""Time per mask-learning step vs a plain forward+backward of the same model and batch.

    python bench/learn_step.py                      # SmolLM2-135M fp32, batch 1x256, all three runs
    python bench/learn_step.py --which tile --steps 6 --json out.json

Each configuration runs in its own subprocess so its peak memory is its own: the peak resident
set (VmHWM) is reset after the model is loaded (``/proc/self/clear_refs``), so the number is
what the step itself adds on top of loading.  "plain" is forward + backward with every weight
requiring grad (full fine-tuning, no optimizer step); the learning steps include sampling the
masks, forward, backward and the Adam step on the logits (the trainer's per-step ``seconds``).
The first 2 steps of every run are warm-up and excluded; the median of the rest is reported.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                    # resets VmHWM (Linux >= 4.0)
    except OSError:
        pass


def run_one(which: str, model_path: str, steps: int, seq_len: int, threads: int) -> dict:
    import torch

    from patchc.data import load_model, load_tokenizer, make_batches, read_text, shakespeare_text_files
    from patchc.learn import LearnConfig, learn_masks

    if threads:
        torch.set_num_threads(threads)
    model = load_model(model_path)
    files = [f for f in shakespeare_text_files() if f.endswith("hamlet_gut.txt")] or shakespeare_text_files()
    text = read_text(files[0])[:200_000] if files else "The quick brown fox jumps over the lazy dog. " * 2000
    batches = make_batches(text, load_tokenizer(model_path), seq_len=seq_len, num_samples=steps + 2, seed=0)
    base = _rss_mib("VmRSS")
    _reset_peak()
    times = []
    t_setup = time.perf_counter()
    if which == "plain":
        model.train()
        t_setup = time.perf_counter() - t_setup
        for b in batches:
            t0 = time.perf_counter()
            loss = model(input_ids=b, labels=b, use_cache=False).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
    else:
        cfg = LearnConfig(mode=which, target_sparsity=0.35, steps=steps + 2, progress=False)
        t0 = time.perf_counter()
        learn_masks(model, batches, cfg, callback=lambda s, r: times.append(r["seconds"]))
        t_setup = time.perf_counter() - t0 - sum(times)
    steady = times[2:] or times
    return {"which": which, "step_s": statistics.median(steady), "steps": len(steady),
            "setup_s": round(t_setup, 2), "rss_after_load_mib": round(base),
            "peak_rss_mib": round(_rss_mib("VmHWM")), "peak_over_load_mib": round(_rss_mib("VmHWM") - base),
            "threads": torch.get_num_threads(), "seq_len": seq_len}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="checkpoint dir or .gguf file (default: bundled SmolLM2-135M)")
    ap.add_argument("--which", choices=["all", "plain", "tile", "joint"], default="all", help="what to time")
    ap.add_argument("--steps", type=int, default=6, help="timed steps after 2 warm-up steps (default: 6)")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens in the single-sample batch (default: 256)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    if args.which != "all":
        print(json.dumps(run_one(args.which, args.model, args.steps, args.seq_len, args.threads)))
        return 0
    rows = []
    for which in ("plain", "tile", "joint"):
        cmd = [sys.executable, os.path.abspath(__file__), "--which", which, "--model", args.model,
               "--steps", str(args.steps), "--seq-len", str(args.seq_len), "--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    plain = rows[0]["step_s"]
    for r in rows[1:]:
        r["vs_plain"] = round(r["step_s"] / plain, 3)
        print(f"{r['which']:>5}: {r['step_s']:.3f} s/step = {r['vs_plain']:.2f}x plain ({plain:.3f} s); "
              f"peak +{r['peak_over_load_mib']} MiB over the loaded model (plain +{rows[0]['peak_over_load_mib']} MiB)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
