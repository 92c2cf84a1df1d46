"""``patchc bench ...``: the benchmarks behind one command (``register(subparsers)``).

    patchc bench compile-time [--quick | --layers N]   compile time, patch vs inductor (CPU)
    patchc bench memory                                 packed vs dense bytes, RSS before / after compile
    patchc bench e2e-decode [--layers 8]                decode tokens/s on a GPU (--device cpu --tiny: smoke)

Each sub-command's options are those of its module (``python -m patchc.bench.<module> --help``).
"""
from __future__ import annotations

import argparse
import sys


def _run(module: str):
    def cmd(args) -> int:
        import importlib
        mod = importlib.import_module(f"patchc.bench.{module}")
        args.cmdline = ("patchc " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"]
                        else f"patchc bench {module.replace('_', '-')}")
        return mod.main_args(args)
    return cmd


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``bench`` (with ``compile-time``, ``memory``, ``e2e-decode``) to a ``patchc`` parser."""
    from . import compile_time, e2e_decode, memory
    b = subparsers.add_parser("bench", help="benchmarks: compile-time, memory, e2e-decode",
                              description="patchc's benchmarks; results and how to read them: bench/README.md.")
    sub = b.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    for name, mod, text in (
            ("compile-time", compile_time, "torch.compile time of backend='patch' vs inductor, cold and warm "
                                           "caches, patchc's own time by part (CPU)"),
            ("memory", memory, "packed vs dense bytes at 25/35/45 %%, resident memory before / after compile "
                               "(string backend vs release_dense)"),
            ("e2e-decode", e2e_decode, "decode tokens/s with a static KV cache: dense torch.compile (with / "
                                       "without CUDA graphs) vs backend='patch' (GPU; --device cpu --tiny: smoke)")):
        p = sub.add_parser(name, help=text, description=(mod.__doc__ or text).split("\n\n")[0])
        mod.add_arguments(p)
        p.set_defaults(func=_run(mod.__name__.rsplit(".", 1)[1]))
    # benchmarks written elsewhere with their own ``main(argv)``: forwarded as they are
    import importlib.util
    for name, module, text in (("quality", "quality", "perplexity vs sparsity of the one-shot and learned "
                                "plans (SmolLM2-135M, CPU)"),
                               ("calibrate", "calibrate", "fit the cost model's device constants on a GPU")):
        if importlib.util.find_spec(f"patchc.bench.{module}") is None:
            continue
        p = sub.add_parser(name, help=text + " (its own options: patchc bench %s --help)" % name,
                           add_help=False, prefix_chars="\x00")
        p.add_argument("argv", nargs="*")
        p.set_defaults(func=_forward(module))
    b.set_defaults(func=lambda args: (b.print_help(), 0)[1])
    return b


def _forward(module: str):
    def cmd(args) -> int:
        import importlib
        return int(importlib.import_module(f"patchc.bench.{module}").main(list(args.argv)) or 0)
    return cmd
