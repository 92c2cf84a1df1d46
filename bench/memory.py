"""Packed vs dense bytes at 25/35/45 % and resident memory before / after compile (string backend
vs ``release_dense``): see ``patchc.bench.memory`` (also ``patchc bench memory``).

    python bench/memory.py --out bench/results/memory.md
"""
import sys

from patchc.bench.memory import main

if __name__ == "__main__":
    sys.exit(main())
