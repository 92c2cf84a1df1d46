"""Quality benchmark (perplexity vs sparsity, SmolLM2-135M, CPU): see ``patchc.bench.quality``.

    python bench/quality.py --quick          # smoke run, bench/results/quality-quick.*
    python bench/quality.py --steps 200      # full table, resumable: bench/results/quality.*
"""
from patchc.bench.quality import main

if __name__ == "__main__":
    raise SystemExit(main())
