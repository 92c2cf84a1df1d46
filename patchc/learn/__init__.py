"""Mask learning (PATCH-Tile, PATCH-Joint) and one-shot pruners. Never imports Triton or FX."""
