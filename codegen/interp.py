"""The Triton interpreter (``TRITON_INTERPRET=1``): detecting it, and one version fix.

Triton 3.6's interpreter turns a loaded scalar into a Python int with ``int(array)`` on a
1-element array, which numpy >= 2.4 refuses (``TypeError: only 0-dimensional arrays can be
converted to Python scalars``) -- every loop bound that comes from memory hits it.  Triton 3.7
squeezes the array first; ``fix_interpreter`` installs the same fix on 3.6, so the declared ranges
(triton >= 3.6, numpy >= 1.24) hold.
"""
from __future__ import annotations

import os

INTERPRET_MSG = ("patchc: kernel='triton' on a CPU tensor runs the Triton interpreter, which needs "
                 "TRITON_INTERPRET=1 in the environment before triton/torch are imported; set it "
                 "(e.g. `TRITON_INTERPRET=1 python ...`) or use kernel='reference'")
_FIXED = []


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def fix_interpreter() -> None:
    """Make scalar ``__index__`` squeeze its array on Triton's interpreter (idempotent)."""
    if _FIXED:
        return
    _FIXED.append(True)
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "_patchc_fixed", False):
        return

    def _patch_lang_tensor(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _patch_lang_tensor._patchc_fixed = True
    interpreter._patch_lang_tensor = _patch_lang_tensor
