"""Damping sweep of the weight reconstruction: perplexity of SmolLM2-135M with a fixed plan, its kept
weights reconstructed (``patchc.learn.reconstruct_weights``, sequential) at every pair of isotropic
damping ``percdamp`` (``--damp``) and per-input damping ``diagdamp`` (``--diagdamp``), on the three
held-out texts of the quality bench (Hamlet + Macbeth, GPL-3, Britannica second half).

    python -m bench.recon_damp --damp 0.01,0.1,0.3,1.0 --diagdamp 0     # isotropic damping alone
    python -m bench.recon_damp --damp 0.01 --diagdamp 0.3,1,3           # per-input damping
    python -m bench.recon_damp --plan masks.safetensors --diagdamp 1 --calib 128 --scale 0.5,0.75
    python -m bench.recon_damp --diagdamp 1 --calib 128 --strength 0.3,0.5,1

``--scale`` also evaluates each setting's update scaled after the pass, W ⊙ M + s·(W′ − W ⊙ M)
(the later blocks were reconstructed against the full update: a probe, not an algorithm);
``--strength`` runs the reconstruction itself at each fraction of the update (the library's
``strength``, each block calibrated on the weakened updates before it; default 1, the full update,
as in the sweeps quoted in :mod:`patchc.learn.recon`).
Prints one line per setting (and the dense and mask-only baselines); ``--out`` writes them as JSON.
This is what chose :data:`patchc.learn.recon.RECON_DIAGDAMP` and :data:`~patchc.learn.recon.RECON_PERCDAMP`.
"""
from __future__ import annotations

import argparse
import copy
import itertools
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
    p.add_argument("--damp", default="0.01", help="comma-separated percdamp values (default 0.01)")
    p.add_argument("--diagdamp", default="0,0.3,1,3", help="comma-separated diagdamp values (default 0,0.3,1,3)")
    p.add_argument("--strength", default="1", help="comma-separated reconstruction strengths (default 1)")
    p.add_argument("--scale", default="", help="comma-separated scales of the update to evaluate too (default none)")
    p.add_argument("--calib", type=int, default=32, help="calibration windows of 256 tokens (seed 0)")
    p.add_argument("--eval", type=int, default=12, help="evaluation windows of 256 tokens per text (seed 1234)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args(argv)
    def numbers(flag, text):
        try:
            return [float(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise SystemExit(f"{flag}: comma-separated numbers expected, got {text!r}") from None
    damps, diagdamps, scales = numbers("--damp", a.damp), numbers("--diagdamp", a.diagdamp), numbers("--scale", a.scale)
    strengths = numbers("--strength", a.strength)
    if not strengths or not all(0 < s <= 1 for s in strengths):
        raise SystemExit(f"--strength: numbers in (0, 1] expected, got {a.strength!r}")
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
        print(f"{name:>32}: " + "  ".join(f"{k} {v:8.3f}" for k, v in r.items()) + extra, flush=True)

    res = {"plan": a.plan or "shipped 35", "calib_windows": a.calib, "eval_windows": a.eval,
           "torch": torch.__version__}
    res["dense"] = ppl(model)
    say("dense", res["dense"])
    res["mask only"] = ppl(patchc.apply_plan(copy.deepcopy(model), plan))
    say("mask only", res["mask only"])
    mods = dict(model.named_modules())

    def with_weights(w):
        m = copy.deepcopy(model)
        m.load_state_dict({f"{k}.weight": v for k, v in w.items()}, strict=False)
        return patchc.apply_plan(m, plan)
    for d, dd, st in itertools.product(damps, diagdamps, strengths):
        t0 = time.perf_counter()
        w = reconstruct_weights(model, plan, calib, sequential=True, percdamp=d, diagdamp=dd, strength=st)
        secs = time.perf_counter() - t0
        name = f"percdamp {d:g} diagdamp {dd:g}" + (f" strength {st:g}" if st != 1 else "")
        res[name] = r = ppl(with_weights(w))
        say(name, r, f"  ({secs:.0f} s)")
        for s in scales:        # pruned positions are 0 in w and masked again by apply_plan
            w_s = {k: mods[k].weight.detach() + s * (v - mods[k].weight.detach()) for k, v in w.items()}
            res[f"{name} scale {s:g}"] = r = ppl(with_weights(w_s))
            say(f"  scale {s:g}", r)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
