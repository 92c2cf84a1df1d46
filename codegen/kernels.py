"""``GeneratedKernel``: one rendered kernel: its spec, source, file, launcher and ``asm()``."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .spec import KernelSpec


@dataclass(eq=False)
class GeneratedKernel:
    """A generated Triton kernel, as listed by ``patchc.kernels(compiled)``.

    ``source`` is the file's text (with its ``@triton.jit`` function ``name``); ``path`` the
    ``kernel.py`` it is imported from.  The module is imported on first launch (``fn``), so
    listing and inspecting kernels needs neither Triton nor a GPU.
    """

    spec: KernelSpec
    key: str
    source: str
    path: Path
    cache_hit: bool = False
    _module: Any = field(default=None, repr=False)
    _lock: Any = field(default_factory=threading.Lock, repr=False)

    @property
    def name(self) -> str:
        """Readable name: shape, dtype, strategy and blocks (also the Triton function's name)."""
        return self.spec.name

    @property
    def module(self):
        """The imported ``kernel.py`` (imports Triton)."""
        if self._module is None:
            with self._lock:
                if self._module is None:
                    from .cache import load_module
                    self._module = load_module(self.path, f"{self.name}_{self.key}")
        return self._module

    @property
    def fn(self):
        """The ``@triton.jit`` function (an ``InterpretedFunction`` under ``TRITON_INTERPRET=1``)."""
        return getattr(self.module, self.name)

    def __call__(self, x, packed, bias=None):
        """Launch on ``x`` (any leading dims) with the packed weight; see ``launch.launch``."""
        from .launch import launch
        return launch(self, x, packed, bias)

    # ---- inspection without a GPU --------------------------------------------------------
    def asm(self, target: str = "sm_90", kind: str = "ptx") -> str:
        """Compiled form for a GPU ``target`` ("sm_80", "sm_90", ...): ``kind`` is one of
        ttir, ttgir, llir, ptx or resources (registers / shared memory / spills, as JSON text).

        Compiles in a subprocess without ``TRITON_INTERPRET`` (so it works in an interpreter
        process too) and caches the result next to ``kernel.py``.
        """
        from .asm import get_asm
        return get_asm(self, target, kind)

    def resources(self, target: str = "sm_90") -> dict:
        """``{"registers", "shared_bytes", "spill_stores", "spill_loads", "stack_bytes", ...}``."""
        import json
        return json.loads(self.asm(target, "resources"))

    def summary(self) -> dict:
        """JSON-able description (name, key, path, spec)."""
        return {"name": self.name, "key": self.key, "path": str(self.path), "cache_hit": self.cache_hit,
                "spec": self.spec.to_dict()}

    def __repr__(self) -> str:
        return f"GeneratedKernel({self.name}, key={self.key}, path={str(self.path)!r})"


def find_kernel(kernels, name: str) -> Optional[GeneratedKernel]:
    """The kernel called ``name`` in ``kernels`` (None when absent)."""
    return next((k for k in kernels if k.name == name), None)
