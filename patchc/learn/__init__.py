"""Mask learning (PATCH-Tile, PATCH-Joint) and one-shot pruners. Never imports Triton or FX.

Public names load on first use (PEP 562), so ``import patchc.learn`` stays light:

- :func:`learn_masks`, :class:`LearnConfig` — learn a hybrid dense/2:4 tile plan, on one process
  or under torchrun (data parallel, or sharded with FSDP2 for 7B-8B models);
- :func:`oneshot`, :func:`oneshot_hybrid` — magnitude / Wanda / SparseGPT without learning,
  calibrated one decoder block at a time (optionally on the already-pruned blocks' outputs);
  SparseGPT's updated weights returned on request;
- :func:`reconstruct_weights` — the least-squares update of a plan's kept weights (SparseGPT's
  OBS update with the mask fixed, 0.3 of it by default), one decoder block at a time;
- :func:`masked_forward` — run a model with a plan's masks applied on the fly.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "learn_masks": "patchc.learn.trainer",
    "LearnConfig": "patchc.learn.config",
    "oneshot": "patchc.learn.pruners",
    "oneshot_hybrid": "patchc.learn.pruners",
    "masked_forward": "patchc.learn.masking",
    "reconstruct_weights": "patchc.learn.recon",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'patchc.learn' has no attribute {name!r}")
