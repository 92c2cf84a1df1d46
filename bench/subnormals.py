"""Why late learning steps slowed down, measured: subnormal floats in the relaxed W ⊙ M.

Takes a learning checkpoint of SmolLM2-135M (``patchc learn --checkpoint-dir`` / the quality
bench's ``bench/results/quality/ckpt/<row>``; the sharded format, read whole), draws each chosen layer's relaxed mask at the
schedule's last step (τ = 0.05, κ at their end values) with and without patchc's floor on tiny
mask values, and reports the subnormal share of W ⊙ M and the time of ``x @ (W ⊙ M)ᵀ``
(x: 256 tokens), the GEMM a learning step runs per layer, forward and backward.

    python bench/subnormals.py bench/results/quality/ckpt/patch-joint-25
"""
from __future__ import annotations

import argparse
import os
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt_dir", help="checkpoint directory of a joint- or tile-mode run (holding learn_ckpt.json)")
    p.add_argument("--layers", default="model.layers.10.mlp.gate_proj,model.layers.10.self_attn.q_proj",
                   help="comma-separated linear names (default: two of block 10)")
    p.add_argument("--repeat", type=int, default=10, help="GEMMs timed per case (default 10)")
    args = p.parse_args()

    from patchc.data import bundled_smollm2_path, load_model
    from patchc.learn import masking, state
    from patchc.learn.checkpoint import read_tensors
    from patchc.learn.config import LearnConfig
    from patchc.modules import oriented_weight

    header, tensors = read_tensors(args.ckpt_dir)
    path = os.path.join(args.ckpt_dir, header["dir"])
    cfg_d = header["config"]
    cfg = LearnConfig(**{k: cfg_d[k] for k in ("mode", "tile", "tau", "kappa_24", "kappa_tile", "steps")},
                      progress=False)
    sched = cfg.schedule(cfg.steps - 1) | {"tau": cfg.tau[1]}
    mods = dict(load_model(bundled_smollm2_path()).named_modules())
    print(f"{path}: mode {cfg.mode}, last-step schedule tau {sched['tau']:.3f} kappa_tile {sched['kappa_tile']:.0f} "
          f"kappa_24 {sched['kappa_24']:.0f}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| layer | floor | subnormal share of W ⊙ M | x @ (W ⊙ M)ᵀ ms |\n|---|---|---|---|")
    floor = masking._FLOOR
    for name in args.layers.split(","):
        w = oriented_weight(mods[name]).detach()
        pattern = tensors[f"{name}.pattern_logits"] if cfg.mode == "joint" else None
        layer = state.MaskState(name, mods[name], cfg.tile, cfg.mode, tensors[f"{name}.tile_logits"], pattern,
                                tensors.get(f"{name}.pattern24"))
        x = torch.randn(256, w.shape[1])
        for on in (False, True):
            masking._FLOOR = floor if on else 0.0
            layer.ctx = state.StepContext(torch.Generator().manual_seed(0))
            layer.ctx.sched = sched
            with torch.no_grad():
                gen = layer._generator()
                cur = layer.masked_weight(w, layer.gate(gen), layer.pattern_logits, gen)
            sub = ((cur != 0) & (cur.abs() < torch.finfo(cur.dtype).tiny)).float().mean().item()
            x @ cur.t()
            t0 = time.perf_counter()
            for _ in range(args.repeat):
                x @ cur.t()
            ms = (time.perf_counter() - t0) / args.repeat * 1e3
            print(f"| {name} | {'<1e-20 → 0' if on else 'none'} | {sub:.2%} | {ms:.1f} |")
    masking._FLOOR = floor


if __name__ == "__main__":
    main()
