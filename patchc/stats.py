"""``patchc.counters``: process-wide event counts and seconds.  Tests and benchmarks read them to
check what ran.

Compile: ``sites_rewritten`` (hybrid), ``sites_masked_dense`` (dense), ``sites_fused``,
``groups_fused``.  Calls of ``patchc::hybrid_linear``, per member linear: ``linear_calls``, split
by the path taken: ``triton_calls``, ``reference_calls``, ``dense_dispatch_calls`` (the cost
model's dense at that M), ``dtype_fallback_calls``; ``fused_calls`` once per fused call;
``masked_weight_calls`` (W ⊙ M for a fallback or a backward).  Weights: ``packs``,
``masked_weight_builds`` (the reference / dense path's W ⊙ M, or the check that the weights hold
it, done once per weights' state and device / dtype), ``repacks``
(a weight changed after compile), ``released``.  Seconds: ``load_seconds`` (mask files),
``cost_model_seconds`` (dispatch plans, fusion predictions), ``codegen_seconds`` (rendering and
caching kernels in the compile), ``pack_seconds``, ``masked_weight_seconds`` (building W ⊙ M for
the reference / dense path).  ``GraphRecord.seconds`` has each pass's own time."""
from __future__ import annotations

import collections
import time
from contextlib import contextmanager


class Counters(collections.Counter):
    """A ``collections.Counter``; ``reset()`` clears it."""

    def reset(self) -> None:
        self.clear()

    @contextmanager
    def timed(self, key: str):
        """Add the seconds the block takes to ``self[key]``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self[key] += time.perf_counter() - t0


counters = Counters()
