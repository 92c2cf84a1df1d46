"""End-to-end decode tokens/s on a GPU (LLaMA-2-7B shapes): dense torch.compile with / without CUDA
graphs vs backend="patch" with CUDA graphs; see ``patchc.bench.e2e_decode`` (also
``patchc bench e2e-decode``).

On a lent GPU machine (installs this checkout without touching its torch / triton), one call:

    python3 -m pip install -q --no-deps --no-build-isolation -e . && python3 bench/e2e_decode.py --layers 8

Results go to $OUT (else bench/results/e2e_decode.{md,csv,json}).  Without a GPU, check the logic:

    python bench/e2e_decode.py --device cpu --tiny --compiler eager
"""
import sys

from patchc.bench.e2e_decode import main

if __name__ == "__main__":
    sys.exit(main())
