"""Damping sweep of the weight reconstruction: perplexity of SmolLM2-135M with a fixed plan, its kept
weights reconstructed (``patchc.learn.reconstruct_weights``, sequential) at several ``percdamp``,
on the three held-out texts of the quality bench (Hamlet + Macbeth, GPL-3, Britannica second half).

    python -m bench.recon_damp                                   # the shipped 35 % plan
    python -m bench.recon_damp --plan masks.safetensors --damp 0.01,0.3 --calib 128 --eval 32

Prints one line per setting (and the dense and mask-only baselines); ``--out`` writes them as JSON.
This is what chose :data:`patchc.learn.recon.RECON_PERCDAMP`.
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch


def main(argv=None) -> int:
    from patchc.data import default_calibration_sources, heldout_texts, load_model, load_tokenizer, make_batches
    from patchc.demo import perplexity, shipped_plan
    from patchc.learn import reconstruct_weights
    from patchc.plan import MaskPlan
    import patchc

    p = argparse.ArgumentParser(prog="python -m bench.recon_damp", description=__doc__.split("\n\n")[0])
    p.add_argument("--plan", default=None, help="plan file (default: the shipped 35 %% SmolLM2 plan)")
    p.add_argument("--damp", default="0.01,0.1,0.3,1.0", help="comma-separated percdamp values")
    p.add_argument("--calib", type=int, default=32, help="calibration windows of 256 tokens (seed 0)")
    p.add_argument("--eval", type=int, default=12, help="evaluation windows of 256 tokens per text (seed 1234)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args(argv)
    try:
        damps = [float(x) for x in a.damp.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--damp: comma-separated numbers expected, got {a.damp!r}") from None
    if a.threads:
        torch.set_num_threads(a.threads)
    model, tok = load_model("smollm2").eval(), load_tokenizer("smollm2")
    plan = MaskPlan.load(a.plan or shipped_plan("35")).validate_against(model)
    calib = make_batches(default_calibration_sources(), tok, 256, a.calib, 1, 0)
    held = heldout_texts()
    evals = {k: make_batches(held[k], tok, 256, a.eval, 1, 1234) for k in ("plays", "gpl3", "britannica")}

    def ppl(m):
        return {k: perplexity(m, b) for k, b in evals.items()}

    def say(name, r, extra=""):
        print(f"{name:>14}: " + "  ".join(f"{k} {v:8.3f}" for k, v in r.items()) + extra, flush=True)

    res = {"plan": a.plan or "shipped 35", "calib_windows": a.calib, "eval_windows": a.eval,
           "torch": torch.__version__}
    res["dense"] = ppl(model)
    say("dense", res["dense"])
    res["mask only"] = ppl(patchc.apply_plan(copy.deepcopy(model), plan))
    say("mask only", res["mask only"])
    for d in damps:
        t0 = time.perf_counter()
        w = reconstruct_weights(model, plan, calib, sequential=True, percdamp=d)
        secs = time.perf_counter() - t0
        m = copy.deepcopy(model)
        m.load_state_dict({f"{k}.weight": v for k, v in w.items()}, strict=False)
        res[f"percdamp {d:g}"] = r = ppl(patchc.apply_plan(m, plan))
        say(f"percdamp {d:g}", r, f"  ({secs:.0f} s)")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
