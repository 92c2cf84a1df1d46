"""Compile time of backend="patch" vs inductor on a ~0.7 B Llama-style model (CPU): see
``patchc.bench.compile_time`` (also ``patchc bench compile-time``).

    python bench/compile_time.py --quick                                   # 4 layers
    python bench/compile_time.py --out bench/results/compile_time.md       # 24 layers, ~15-25 min
"""
import sys

from patchc.bench.compile_time import main

if __name__ == "__main__":
    sys.exit(main())
