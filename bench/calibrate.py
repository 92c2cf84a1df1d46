"""Calibrate the cost model on this GPU (``patchc bench calibrate``); see patchc/bench/calibrate.py.

    python3 bench/calibrate.py [--budget 45] [--dry-run]
"""
import sys

from patchc.bench.calibrate import main

if __name__ == "__main__":
    sys.exit(main())
