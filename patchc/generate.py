"""``generate()`` through the compiled forward for transformers models.

``torch.compile(model).generate(...)`` runs the *original* forward: ``generate`` belongs to the
model and calls the model, not the compiled wrapper, so a sparse model would silently decode
dense.  ``patchc.compile`` returns a wrapper whose ``generate`` swaps the model's ``forward`` for a
compiled one (same backend, same options) while it runs; for ``torch.compile(model,
backend="patch")`` patchc gives the wrapper the same ``generate`` when dynamo creates it.
"""
from __future__ import annotations

import contextlib
import logging
import threading

import torch
from torch import nn

log = logging.getLogger("patchc")


@contextlib.contextmanager
def forward_swapped(model: nn.Module, forward):
    """``model.forward`` is ``forward`` inside the block (an instance attribute, restored after)."""
    had = "forward" in model.__dict__
    old = model.__dict__.get("forward")
    model.forward = forward
    try:
        yield
    finally:
        if had:
            model.forward = old
        else:
            del model.forward


class CompiledGenerate:
    """``generate(...)`` of ``model`` with its forward compiled by ``backend`` (compiled on first use)."""

    def __init__(self, model: nn.Module, backend, dynamic=None):
        self.model, self.backend, self.dynamic = model, backend, dynamic
        self.forward = None
        self._lock = threading.Lock()

    def __call__(self, *args, **kwargs):
        with self._lock:
            if self.forward is None:
                self.forward = torch.compile(self.model.forward, backend=self.backend, dynamic=self.dynamic)
            with forward_swapped(self.model, self.forward):
                return self.model.generate(*args, **kwargs)


def _backend_of(dynamo_ctx):
    """The user's backend object behind a dynamo context (``_TorchCompileWrapper`` for a string
    backend with options), or None."""
    fn = getattr(dynamo_ctx, "callback", None)
    seen = 0
    while fn is not None and hasattr(fn, "_torchdynamo_orig_backend") and seen < 16:
        fn = fn._torchdynamo_orig_backend
        seen += 1
    return fn


def install_wrapper_hook(patch_backend) -> bool:
    """Give every ``OptimizedModule`` dynamo creates with ``backend="patch"`` around a model that
    has ``generate`` a ``generate`` that runs the compiled forward.  Returns whether the hook is in
    place (False where this torch's internals differ: the README's pattern still works)."""
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except ImportError:
        return False
    init = OptimizedModule.__init__
    if getattr(init, "_patchc_generate", False):
        return True

    def __init__(self, mod, dynamo_ctx, *args, **kwargs):
        init(self, mod, dynamo_ctx, *args, **kwargs)
        backend = _backend_of(dynamo_ctx)
        if getattr(backend, "compiler_fn", backend) is patch_backend and callable(getattr(mod, "generate", None)):
            # on the wrapper itself: OptimizedModule.__setattr__ would set it on the user's model
            object.__setattr__(self, "generate", CompiledGenerate(mod, backend))

    __init__._patchc_generate = True
    __init__.__wrapped__ = init
    OptimizedModule.__init__ = __init__
    return True
