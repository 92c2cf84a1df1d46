"""``patchc bench ...``: the benchmarks of a source checkout behind one command (``register``).

    patchc bench compile-time [--quick | --layers N]   compile time, patch vs inductor (CPU)
    patchc bench memory                                 packed vs dense bytes, RSS before / after compile
    patchc bench e2e-decode [--layers 8]                decode tokens/s on a GPU (--device cpu --tiny: smoke)
    patchc bench quality [--quick]                      perplexity vs sparsity (SmolLM2-135M, CPU)

Each sub-command's options are those of its module (``python -m bench.<module> --help``); the
modules named in ``FORWARDED`` parse their own arguments (``main(argv)``).
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, help): modules with add_arguments / main_args
PARSED = {
    "compile-time": ("compile_time", "torch.compile time of backend='patch' vs inductor, cold and warm caches, "
                                     "patchc's own time by part (CPU)"),
    "memory": ("memory", "packed vs dense bytes at 25/35/45 %%, resident memory before / after compile (string "
                         "backend vs release_dense), and what deleting the compiled model frees"),
    "e2e-decode": ("e2e_decode", "decode tokens/s with a static KV cache: dense torch.compile (with / without CUDA "
                                 "graphs) vs backend='patch' (GPU; --device cpu --tiny: smoke)"),
}
# name -> (module, help): modules with their own ``main(argv)``, forwarded as they are
FORWARDED = {
    "quality": ("quality", "perplexity vs sparsity of the one-shot and learned plans (SmolLM2-135M, CPU)"),
    "calibrate": ("patchc.calibrate", "fit the cost model's device constants on this GPU (same as patchc calibrate)"),
    "roofline": ("roofline", "per-kernel instruction and byte demand at full bandwidth, from the SASS (no GPU)"),
    "learn-memory": ("learn_memory", "bytes per weight of mask learning, 1 and 2 ranks, projected to 7B / 8B"),
}


def _module(name: str):
    return importlib.import_module(name if "." in name else f"bench.{name}")


def _available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name if "." in name else f"bench.{name}") is not None
    except ImportError:
        return False


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``bench`` and its sub-commands to a ``patchc`` parser."""
    b = subparsers.add_parser("bench", help="benchmarks of a source checkout (bench/README.md)",
                              description="patchc's benchmarks; results and how to read them: bench/README.md.")
    sub = b.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    for name, (module, text) in PARSED.items():
        mod = _module(module)
        p = sub.add_parser(name, help=text, description=(mod.__doc__ or text).split("\n\n")[0])
        mod.add_arguments(p)
        p.set_defaults(func=_run(module, name))
    for name, (module, text) in FORWARDED.items():
        if not _available(module):
            continue
        p = sub.add_parser(name, help=text + f" (its own options: patchc bench {name} --help)",
                           add_help=False, prefix_chars="\x00")
        p.add_argument("argv", nargs="*")
        p.set_defaults(func=_forward(module))
    b.set_defaults(func=lambda args: (b.print_help(), 0)[1])
    return b


def _run(module: str, name: str):
    def cmd(args) -> int:
        args.cmdline = ("patchc " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else f"patchc bench {name}")
        return _module(module).main_args(args)
    return cmd


def _forward(module: str):
    def cmd(args) -> int:
        return int(_module(module).main(list(args.argv)) or 0)
    return cmd
