"""Importing a generated kernel file (Triton's JIT needs real source on disk, not ``exec``).

A leaf module: ``GeneratedKernel`` stays plain data and imports nothing from here until a kernel is
launched or compiled.
"""
from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path
from typing import Union


def load_module(path: Union[str, Path], tag: str = ""):
    """Import a generated kernel file under a unique module name (one module per file and process)."""
    path = Path(path)
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]
    name = f"_patchc_kernel_{tag or path.parent.name}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    mod_spec = importlib.util.spec_from_file_location(name, path)
    if mod_spec is None or mod_spec.loader is None:
        raise ImportError(f"cannot import generated kernel {path}")
    mod = importlib.util.module_from_spec(mod_spec)
    sys.modules[name] = mod
    try:
        mod_spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return mod
