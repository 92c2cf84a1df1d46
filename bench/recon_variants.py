"""Variants of the weight reconstruction that patchc measured and did not adopt (see
``bench/results/quality/NOTES.md``), on SmolLM2-135M with a fixed plan, evaluated like
``bench/recon_damp.py`` (perplexity on the three held-out texts):

- ``lib``: :func:`patchc.learn.reconstruct_weights` (sequential; the block's linears at once; the full update);
- ``local``: "true sequential": within a block, q/k/v, then o, then gate/up, then down, each group
  calibrated with the groups before it already reconstructed (target W·X, X the sparse stream's input);
- ``ec``: as ``local`` but each linear fitted to the dense model's output W·X_dense (ridge toward W,
  then the OBS update with the mask fixed), so that it corrects the error of the layers before it.

    python -m bench.recon_variants --variant local --percdamp 0.1 --out local.json
"""
import argparse, copy, json, os, time  # noqa: E401

import torch

from patchc.data import default_calibration_sources, heldout_texts, load_model, load_tokenizer, make_batches
from patchc.plan import MaskPlan
from patchc.learn.stream import _first, _with_hidden, block_inputs, substituted
from patchc.learn.sparsegpt import sparsegpt_prune
from patchc.learn.recon import reconstruct_weights
from patchc.demo import perplexity, shipped_plan
import patchc

p = argparse.ArgumentParser()
p.add_argument("--plan", default=None, help="plan file (default: the shipped 35 %% SmolLM2 plan)")
p.add_argument("--variant", default="local", choices=("lib", "local", "ec"))
p.add_argument("--percdamp", type=float, default=0.01)
p.add_argument("--calib", type=int, default=32)
p.add_argument("--eval", type=int, default=12)
p.add_argument("--alpha", type=float, default=1.0, help="ec: blend of dense target (1) and sparse target (0)")
p.add_argument("--out", default=None)
a = p.parse_args()
torch.set_num_threads(1)
model, tok = load_model("smollm2"), load_tokenizer("smollm2")
model.eval()
calib = make_batches(default_calibration_sources(), tok, 256, a.calib, 1, 0)
held = heldout_texts()
evals = {k: make_batches(held[k], tok, 256, a.eval, 1, 1234) for k in ("plays", "gpl3", "britannica")}
plan = MaskPlan.load(a.plan or shipped_plan("35")).validate_against(model)
mods = dict(model.named_modules())
t0 = time.time()
GROUPS = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
          ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def capture(blk, names, inputs):
    xs = {n: [] for n in names}
    hs = []
    mods_blk = dict(blk.named_modules())
    for n in names:
        m = mods_blk[n]
        hs.append(m.register_forward_pre_hook(lambda mod, args, n=n: xs[n].append(args[0].detach().reshape(-1, args[0].shape[-1]).float())))
    outs = []
    try:
        for args, kw in inputs:
            outs.append(_first(blk(*args, **kw)))
    finally:
        for h in hs:
            h.remove()
    return {n: torch.cat(v) for n, v in xs.items()}, outs


with torch.no_grad():
    if a.variant == "lib":
        weights = reconstruct_weights(model, plan, calib, sequential=True, percdamp=a.percdamp, strength=1.0)
    else:
        blocks = model.model.layers
        ins = block_inputs(model, blocks[0], [{"input_ids": c} for c in calib])
        ins_s = ins_d = ins
        weights = {}
        for i, blk in enumerate(blocks):
            pre = f"model.layers.{i}."
            allnames = [n for g in GROUPS for n in g]
            Xd, outs_d = capture(blk, allnames, ins_d) if a.variant == "ec" else (None, None)
            if outs_d is None:
                outs_d = [_first(blk(*ar, **kw)) for ar, kw in ins_d]
            done = {}
            for g in GROUPS:
                with substituted({pre + n: mods[pre + n] for n in done}, {pre + n: w for n, w in done.items()}):
                    Xs, _ = capture(blk, g, ins_s)
                for n in g:
                    full = pre + n
                    if full not in plan:
                        continue
                    W = mods[full].weight.detach().float()
                    X = Xs[n]
                    H = X.t() @ X
                    if a.variant == "ec":
                        C = Xd[n].t() @ X           # X_d^T X_s  [K, K]
                        damp = a.percdamp * torch.diag(H).mean()
                        Hd = H + damp * torch.eye(H.shape[0])
                        Wu = torch.linalg.solve(Hd, (W @ C + damp * W).t()).t()   # W (C + dI) Hd^-1: ridge toward W
                        Wt = a.alpha * Wu + (1 - a.alpha) * W
                    else:
                        Wt = W
                    keep = plan[full].unpacked()
                    _, w2 = sparsegpt_prune(Wt, H * (2.0 / X.shape[0]), mask=keep, percdamp=a.percdamp)
                    done[n] = w2
                    weights[full] = w2
            with substituted({pre + n: mods[pre + n] for n in done}, {pre + n: w for n, w in done.items()}):
                outs_s = [_first(blk(*ar, **kw)) for ar, kw in ins_s]
            ins_s = [_with_hidden(ar, kw, o) for (ar, kw), o in zip(ins_s, outs_s)]
            ins_d = [_with_hidden(ar, kw, o) for (ar, kw), o in zip(ins_d, outs_d)]
            print(f"block {i}: {time.time() - t0:.0f} s", flush=True)
    tr = time.time() - t0
    m2 = copy.deepcopy(model)
    m2.load_state_dict({f"{k}.weight": v.to(torch.float32) for k, v in weights.items()}, strict=False)
    m2 = patchc.apply_plan(m2, plan)
    res = {k: perplexity(m2, b) for k, b in evals.items()}
with torch.no_grad():
    base = {"dense": {k: perplexity(model, b) for k, b in evals.items()},
            "mask": {k: perplexity(patchc.apply_plan(copy.deepcopy(model), plan), b) for k, b in evals.items()}}
out = {"args": vars(a), "recon_s": tr, "ppl": res, **base}
if a.out:
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
print(json.dumps(out))
