"""``GeneratedKernel``: one rendered kernel as plain data -- spec, cache key, source, file.

Listing and inspecting kernels needs neither Triton nor a GPU; launching imports the file
(``load.load_module``), compiling for a GPU target happens in a child process (``asm``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .spec import KernelSpec


@dataclass(frozen=True, eq=False)
class GeneratedKernel:
    """A generated Triton kernel, as listed by ``patchc.kernels(compiled)``: ``source`` is the
    text of ``path`` (a ``kernel.py`` with one ``@triton.jit`` function named ``name``)."""

    spec: KernelSpec
    key: str
    source: str
    path: Path
    cache_hit: bool = False

    @property
    def name(self) -> str:
        """Readable name: strategy, shape, dtype, blocks (also the Triton function's name)."""
        return self.spec.name

    def asm(self, target: str = "sm_90", kind: str = "ptx") -> str:
        """The kernel compiled for a GPU ``target`` ("sm_80", "sm_90", ...) exactly as a launch
        specialises it (``args.sample_args``), without a GPU: ``kind`` is one of ttir, ttgir,
        llir, ptx, sass, loops (its inner loops' SASS counts, JSON) or resources (registers /
        shared memory / spills / specialisation, JSON).  Cached next to ``kernel.py``."""
        from .asm import get_asm
        return get_asm(self, target, kind)

    def resources(self, target: str = "sm_90") -> dict:
        """``{"registers", "shared_bytes", "spill_stores", "spill_loads", "pipeline_depth", ...}``."""
        return json.loads(self.asm(target, "resources"))

    def loops(self, target: str = "sm_90") -> list:
        """The innermost loops of the SASS (2:4 loop, dense loop), per warp and iteration."""
        return json.loads(self.asm(target, "loops")) or []

    def summary(self) -> dict:
        """JSON-able description (name, key, path, spec)."""
        return {"name": self.name, "key": self.key, "path": str(self.path), "cache_hit": self.cache_hit,
                "spec": self.spec.to_dict()}

    def __repr__(self) -> str:
        return f"GeneratedKernel({self.name}, key={self.key}, path={str(self.path)!r})"
