"""``HybridRunner``: what ``runtime.Entry.runner`` holds -- the generated kernel for a call's M
(``kernel_for``), or None where the cost model says dense wins.

It dispatches on M over ``ranges``: ``[(m_hi or None, params)]`` in increasing M, ``params``
being the launch parameters of a hybrid kernel (``block_m``, ``split_k``, ``num_warps``,
``num_stages``), ``None`` (``launch.default_blocks``) or ``{"strategy": "dense"}`` (the cost model
says dense wins there: the runtime computes ``F.linear`` with W ⊙ M).  This is the form of
``codegen.layout.DispatchPlan.dispatch``; without a plan the ranges are ``launch.M_BUCKETS``.
With ``kernel="triton"`` (or ``force=True``) dense ranges run a Triton kernel too (default
blocks per ``M_BUCKETS`` bucket); under the interpreter the launch parameters are the
interpreter's large blocks.  Kernels are generated on first need and memoised.
"""
from __future__ import annotations

import threading
from typing import Optional

from .cache import get_kernel
from .kernels import GeneratedKernel
from .launch import M_BUCKETS, default_blocks, make_spec
from .spec import dtype_name

DENSE = "dense"
_LAUNCH = ("block_m", "split_k", "num_warps", "num_stages")


def _is_dense(params) -> bool:
    return isinstance(params, dict) and params.get("strategy") == DENSE


class HybridRunner:
    """Per-site launcher: picks the kernel (or dense) by M, generates kernels on first need."""

    def __init__(self, n: int, k: int, dtype, tile, *, cache_dir=None, ranges=None, block_n: Optional[int] = None,
                 block_k: Optional[int] = None, input_precision: Optional[str] = None, force: bool = False):
        self.n, self.k, self.dtype, self.tile = n, k, dtype_name(dtype), tuple(tile)
        self.cache_dir = cache_dir
        self.ranges = list(ranges) if ranges else [(b, None) for b in M_BUCKETS]
        if self.ranges[-1][0] is not None:
            self.ranges.append((None, self.ranges[-1][1]))
        self.fixed = {f: v for f, v in (("block_n", block_n), ("block_k", block_k)) if v}
        self.input_precision = input_precision
        self.force = force
        self._kernels: dict[tuple, Optional[GeneratedKernel]] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_plan(cls, n, k, dtype, tile, plan, **kw) -> "HybridRunner":
        """From a ``DispatchPlan`` (anything with ``dispatch``, ``block_n``, ``block_k``)."""
        return cls(n, k, dtype, tile, ranges=plan.dispatch, block_n=getattr(plan, "block_n", None) or None,
                   block_k=getattr(plan, "block_k", None) or None, **kw)

    def index(self, m: int) -> int:
        return next(i for i, (hi, _) in enumerate(self.ranges) if hi is None or m <= hi)

    def _bounds(self, i: int) -> tuple[int, Optional[int]]:
        return (self.ranges[i - 1][0] + 1 if i else 1), self.ranges[i][0]

    def _rep_m(self, i: int, m: int) -> int:
        """The M default blocks are chosen for: the upper end of m's ``M_BUCKETS`` bucket (4096 when
        open), clipped to range i -- so a long dense range forced to Triton still gets BLOCK_M 16
        at decode and 128 at prefill."""
        lo, hi = self._bounds(i)
        b = next(b for b in M_BUCKETS if b is None or m <= b)
        rep = max(lo, b if b is not None else 4096)
        return min(hi, rep) if hi is not None else rep

    def _planned(self, i: int, interpret: bool) -> bool:
        params = self.ranges[i][1]
        return bool(params) and not interpret and not _is_dense(params)

    def _kernel(self, i: int, m: int, bias: bool, interpret: bool, force: bool) -> Optional[GeneratedKernel]:
        params = self.ranges[i][1]
        if _is_dense(params) and not force:
            return None
        planned = self._planned(i, interpret)
        rep = None if planned else self._rep_m(i, m)
        key = (i, rep, bias, interpret)
        if key not in self._kernels:
            with self._lock:
                blocks = default_blocks(rep or 1, self.n, self.k, self.tile, self.dtype, interpret, **self.fixed)
                if planned:
                    blocks.update({f: params[f] for f in _LAUNCH if params.get(f) is not None})
                blocks.update(self.fixed)
                spec = make_spec(self.n, self.k, self.dtype, self.tile, 0, bias=bias, interpret=interpret,
                                 input_precision=self.input_precision, plan=blocks)
                self._kernels[key] = get_kernel(spec, self.cache_dir)
        return self._kernels[key]

    def kernel_for(self, m: int, bias: bool, interpret: bool, force: bool = False) -> Optional[GeneratedKernel]:
        """The kernel that runs M = m rows (None: dense dispatch)."""
        return self._kernel(self.index(m), m, bias, interpret, force or self.force)

    def kernels(self, bias: bool, interpret: bool, force: bool = False) -> list[GeneratedKernel]:
        """Every distinct kernel of the ranges (generated now), in M order."""
        out = []
        for i in range(len(self.ranges)):
            lo, hi = self._bounds(i)
            reps = {lo} if self._planned(i, interpret) else {self._rep_m(i, m) for m in (lo, 17, 129, hi or 4096)
                                                             if m >= lo and (hi is None or m <= hi)}
            out += [self._kernel(i, m, bias, interpret, force or self.force) for m in sorted(reps)]
        return list({id(g): g for g in out if g is not None}.values())
