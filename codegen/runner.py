"""``HybridRunner``: per site, which generated kernel runs M rows (or None: dense).

It reads ``ranges``: ``[(m_hi or None, params)]`` in increasing M, ``params`` a ``Candidate``
dict (``candidates.Candidate.to_dict``), ``None`` (``default_candidate``) or
``{"strategy": "dense"}`` (the cost model says dense wins there).  This is the form of
``codegen.layout.DispatchPlan.dispatch``; without a plan the ranges are ``M_BUCKETS`` with default
candidates.  With ``force=True`` dense ranges get a kernel too (the default candidate of the
range).  Under the interpreter a candidate runs with the whole tile height per program and 4
tiles per step (the interpreter's cost is per program and step; what it computes is the same);
``tests/test_kernels_interp.py`` runs the small blocks directly.  Kernels are generated on first
need and memoised.
"""
from __future__ import annotations

import threading
from dataclasses import replace
from typing import Optional

import torch

from .cache import get_kernel
from .candidates import Candidate
from .kernels import GeneratedKernel
from .spec import UnsupportedSpec, dtype_name

DENSE = "dense"
# upper M of each default range (None: no bound)
M_BUCKETS = (4, 64, None)


def default_candidate(m: int, dtype="bf16", tile=(128, 128)) -> Candidate:
    """A reasonable kernel for ``m`` rows without a plan: gemv up to 4 rows, mma beyond."""
    if m <= 4:
        bm = 1 if m <= 1 else 2 if m <= 2 else 4
        return Candidate("gemv", bm, 16, 4, 4, 4)
    if dtype_name(dtype) == "fp32":
        return Candidate("mma", 16 if m <= 16 else 32, 32, 1, 4, 2, block_k=32 if tile[1] >= 32 else 0)
    return Candidate("mma", 16 if m <= 16 else 32, 32, 2, 4, 3)


def _is_dense(params) -> bool:
    return isinstance(params, dict) and params.get("strategy") == DENSE


class HybridRunner:
    """Per-site kernel choice by M; generates kernels on first need."""

    def __init__(self, n: int, k: int, dtype, tile, *, cache_dir=None, ranges=None,
                 input_precision: Optional[str] = None, force: bool = False):
        self.n, self.k, self.dtype, self.tile = n, k, dtype_name(dtype), tuple(tile)
        self.cache_dir = cache_dir
        self.ranges = list(ranges) if ranges else [(b, None) for b in M_BUCKETS]
        if self.ranges[-1][0] is not None:
            self.ranges.append((None, self.ranges[-1][1]))
        if input_precision is None and self.dtype == "fp32":
            input_precision = "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
        self.input_precision = input_precision or ""
        self.force = force
        self._kernels: dict[tuple, Optional[GeneratedKernel]] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_plan(cls, n, k, dtype, tile, plan, **kw) -> "HybridRunner":
        """From a ``DispatchPlan`` (anything with ``dispatch``)."""
        kw.pop("block_n", None), kw.pop("block_k", None)
        return cls(n, k, dtype, tile, ranges=plan.dispatch, **kw)

    def index(self, m: int) -> int:
        return next(i for i, (hi, _) in enumerate(self.ranges) if hi is None or m <= hi)

    def _bounds(self, i: int) -> tuple[int, Optional[int]]:
        return (self.ranges[i - 1][0] + 1 if i else 1), self.ranges[i][0]

    def _planned(self, i: int) -> bool:
        params = self.ranges[i][1]
        return bool(params) and not _is_dense(params)

    def _rep_m(self, i: int, m: int) -> int:
        """The M a default candidate is chosen for: the upper end of m's ``M_BUCKETS`` bucket (4096
        when open), clipped to range i -- so a long dense range forced to Triton still runs a few
        rows per program at decode and mma blocks beyond."""
        lo, hi = self._bounds(i)
        b = next(b for b in M_BUCKETS if b is None or m <= b)
        rep = max(lo, b if b is not None else 4096)
        return min(hi, rep) if hi is not None else rep

    def _candidate(self, i: int, m: int) -> Candidate:
        if self._planned(i):
            return Candidate.from_dict(self.ranges[i][1])
        return default_candidate(self._rep_m(i, m), self.dtype, self.tile)

    def _kernel(self, i: int, m: int, bias: bool, interpret: bool, force: bool) -> Optional[GeneratedKernel]:
        params = self.ranges[i][1]
        if _is_dense(params) and not force:
            return None
        cand = self._candidate(i, m)
        if interpret:
            cand = replace(cand, block_n=max(cand.block_n, min(128, 1 << (self.tile[0] - 1).bit_length())),
                           block_t=max(cand.block_t, 4))
        key = (cand, bias, interpret)
        if key not in self._kernels:
            with self._lock:
                try:
                    spec = cand.spec(self.n, self.k, self.dtype, self.tile, bias=bias, interpret=interpret,
                                     input_precision=self.input_precision)
                except UnsupportedSpec:
                    # e.g. an odd K for the 16-bit gemv kernel, or a tile too small for mma: the other one
                    alt = Candidate("mma", 16, 16, 1, 4, 2) if cand.strategy == "gemv" else Candidate("gemv", 1, 16, 1, 4, 2)
                    spec = alt.spec(self.n, self.k, self.dtype, self.tile, bias=bias, interpret=interpret,
                                    input_precision=self.input_precision)
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
            reps = {lo} if self._planned(i) else {self._rep_m(i, m) for m in (lo, 5, 65, hi or 4096)
                                                  if m >= lo and (hi is None or m <= hi)}
            out += [self._kernel(i, m, bias, interpret, force or self.force) for m in sorted(reps)]
        return list({id(g): g for g in out if g is not None}.values())
