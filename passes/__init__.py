"""FX graph passes of the patch backend, one per file; ``PIPELINE`` is the literal order."""
