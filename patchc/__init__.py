"""patchc: learnable tile-level hybrid dense/2:4 sparsity (PATCH), compiled through torch.compile.

``import patchc`` needs neither Triton, a GPU nor transformers; heavier pieces load on first use.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it (imported lazily, PEP 562)
_LAZY = {
    "TileMask": "patchc.types",
    "SiteDecision": "patchc.decisions",
    "MaskPlan": "patchc.plan",
    "MaskPlanError": "patchc.plan",
    "infer_plan": "patchc.plan",
    "apply_plan": "patchc.plan",
    "plan_from_npz": "patchc.npz",
    "PackedWeight": "patchc.packing",
    "pack": "patchc.packing",
    "unpack": "patchc.packing",
    "PatchConfig": "patchc.config",
    "compile": "patchc.api",
    "explain": "patchc.api",
    "kernels": "patchc.api",
    "counters": "patchc.stats",
    "memory_report": "patchc.api",
    "reset": "patchc.caches",
    "learn_masks": "patchc.learn",
    "LearnConfig": "patchc.learn",
    "choose_layout": "patchc.codegen.layout",
}
_SUBMODULES = {"prune", "learn", "data", "passes", "codegen", "backend", "runtime", "plan", "types", "ops"}

__all__ = sorted(_LAZY) + sorted(_SUBMODULES)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"patchc.{name}")
    raise AttributeError(f"module 'patchc' has no attribute {name!r}")
