"""Tile layout choice: per weight BLOCK_N / BLOCK_K and tile-row order, per M the launch config.

Packing is once per weight, so BLOCK_N, BLOCK_K (dividing the mask tile) and the tile-row order
are chosen for the decode regime (M = 1 and 16), where hybrid pays.  Inside a packed tile-row
the 2:4 tiles come first, then the dense ones (``patchc.packing.pack`` does that); tile-rows are
ordered by decreasing dense-tile count (the most work first), so programs of equal work share a
wave; the kernel's store puts rows back (``row_order``).  Per M the cost model then picks
BLOCK_M, split-K, warps and stages -- or dense (cuBLAS-like ``torch.mm``) where hybrid would lose.

Planning a model is planning many weights of few shapes, so the work is cached in two levels:
``_Shape`` (shape, tile, dtype, device, fp32 precision: the dense baseline and its minimum at
every M, the feasible launch grid, ``cost.HybridBatch`` index structures) and ``_Site`` (the
tile map's sorted per-row 2:4 counts, all the model reads of it).  A new tile map of a known shape
costs ~15-20 ms of CPU (was 0.4-1.2 s); the results are the same floats as before.
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from patchc.packing import balanced_row_order
from patchc.types import grid_of

from patchc.dtypes import ELT_BYTES

from .cost import TABLE_MAX, CostModel, HybridBatch, KernelParams, lower_envelope, occupancy
from .devices import dtype_key, get_device

M_MAX = 65536
DECODE_M = (1, 16)            # the regime BLOCK_N / BLOCK_K are chosen for (BLOCK_M 16: one M-block)
MAX_HYBRID = 3                # distinct hybrid kernels per site (each is a compiled variant)
BLOCKS = (16, 32, 64, 128)    # BLOCK_N / BLOCK_K: powers of two >= 16 (tl.arange, tl.dot)
# per-M launch grid; up to 6 stages: at decode a program needs ~latency x bandwidth bytes in flight
HYBRID_GRID = dict(block_m=(16, 32, 64, 128), split_k=(1, 2, 4, 8, 16), num_warps=(4, 8), num_stages=(2, 3, 4, 5, 6))
# a cuBLAS-like family for the dense baseline (gemv-like split-K at small M, big tiles at large M);
# dense also gets every hybrid config run as a dense kernel, so where compute binds hybrid never wins
DENSE_CONFIGS = (
    [KernelParams(16, bn, 128, s, 4, 5) for bn in (32, 64, 128) for s in (1, 2, 4, 8, 16)]
    + [KernelParams(bm, bn, 64, s, 4, 4) for bm in (32, 64) for bn in (64, 128) for s in (1, 2, 4)]
    + [KernelParams(128, 128, 64, 1, 8, 3), KernelParams(128, 256, 64, 1, 8, 3),
       KernelParams(256, 128, 64, 1, 8, 3), KernelParams(128, 128, 64, 1, 4, 4)]
    # BLOCK_K 32: big tiles that still fit fp32 or 100 KB of shared memory (Ada, GA102)
    + [KernelParams(bm, bn, 32, 1, 8, st) for bm, bn in ((128, 128), (128, 256), (256, 128)) for st in (2, 3)])
DENSE = "dense"


@dataclass(frozen=True)
class HybridCandidate:
    """The M-dependent launch parameters of a hybrid kernel (BLOCK_N / BLOCK_K are per weight)."""

    block_m: int
    split_k: int
    num_warps: int
    num_stages: int

    def to_dict(self) -> dict:
        return dict(block_m=self.block_m, split_k=self.split_k, num_warps=self.num_warps, num_stages=self.num_stages)

    @classmethod
    def from_dict(cls, d: dict) -> "HybridCandidate":
        return cls(int(d["block_m"]), int(d["split_k"]), int(d["num_warps"]), int(d["num_stages"]))


@dataclass(frozen=True, eq=False)
class TileLayout:
    """The cost model's answer for one weight at one M."""

    strategy: str                 # "hybrid" | "dense" at this M
    m: int
    dtype: str
    device: str
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int
    predicted_us: float           # of the chosen strategy
    dense_us: float               # cuBLAS-like dense, same model
    row_order: torch.Tensor       # int32 [nN], for patchc.packing.pack(..., row_order=)
    alternatives: tuple = ()      # rejected ((params dict, predicted_us), ...), cheapest first
    reason: str = ""
    breakdown: dict = field(default_factory=dict)

    @property
    def speedup(self) -> float:
        return self.dense_us / self.predicted_us

    def params(self) -> dict:
        return {f: getattr(self, f) for f in ("block_m", "block_n", "block_k", "split_k", "num_warps", "num_stages")}

    def to_dict(self) -> dict:
        return dict(strategy=self.strategy, m=self.m, dtype=self.dtype, device=self.device, **self.params(),
                    predicted_us=self.predicted_us, dense_us=self.dense_us, reason=self.reason,
                    row_order=self.row_order.tolist(), breakdown=self.breakdown,
                    alternatives=[dict(params=p, predicted_us=t) for p, t in self.alternatives])


@dataclass(frozen=True, eq=False)
class DispatchPlan:
    """Per-M choice for one weight: sorted ``ranges`` of (m_lo, m_hi, candidate) covering 1..m_max,
    a candidate being a ``HybridCandidate`` or ``"dense"``.  ``select(m)`` bisects the thresholds."""

    strategy: str                 # "hybrid" (some M range is hybrid) | "dense" (none is)
    reason: str
    dtype: str
    device: str
    shape: tuple
    tile: tuple
    block_n: int
    block_k: int
    row_order: torch.Tensor
    m_max: int
    ranges: tuple

    @property
    def thresholds(self) -> list[int]:
        """First M of every range after the first."""
        return [lo for lo, _, _ in self.ranges[1:]]

    @property
    def candidates(self) -> list:
        return list(dict.fromkeys(c for _, _, c in self.ranges))

    def select(self, m: int):
        """The candidate for M = m (M above m_max gets the last range's)."""
        i = int(np.searchsorted(np.asarray(self.thresholds, dtype=np.int64), m, side="right"))
        return self.ranges[min(i, len(self.ranges) - 1)][2]

    @property
    def dispatch(self) -> list:
        """``[(m_hi or None, params dict)]`` in the form ``passes/generate_kernels`` reads."""
        out = [(hi, c.to_dict() if c != DENSE else {"strategy": DENSE}) for _, hi, c in self.ranges]
        return out[:-1] + [(None, out[-1][1])]

    def to_dict(self) -> dict:
        return dict(strategy=self.strategy, reason=self.reason, dtype=self.dtype, device=self.device,
                    shape=list(self.shape), tile=list(self.tile), block_n=self.block_n, block_k=self.block_k,
                    m_max=self.m_max, thresholds=self.thresholds,
                    ranges=[dict(m_lo=lo, m_hi=hi, candidate=c if c == DENSE else c.to_dict())
                            for lo, hi, c in self.ranges])

    @classmethod
    def from_dict(cls, d: dict, row_order) -> "DispatchPlan":
        """The plan ``to_dict`` wrote (``row_order`` is not in it: pass it along)."""
        ranges = tuple((int(r["m_lo"]), int(r["m_hi"]),
                        DENSE if r["candidate"] == DENSE else HybridCandidate.from_dict(r["candidate"]))
                       for r in d["ranges"])
        return cls(d["strategy"], d["reason"], dtype=d["dtype"], device=d["device"], shape=tuple(d["shape"]),
                   tile=tuple(d["tile"]), block_n=int(d["block_n"]), block_k=int(d["block_k"]),
                   row_order=torch.as_tensor(row_order, dtype=torch.int32), m_max=int(d["m_max"]), ranges=ranges)


# ---- per (shape, tile, dtype, device, precision): the dense baseline and the launch grid ------------
class _Shape:
    """What does not depend on the tile map: the dense baseline curves (per BLOCK_N / BLOCK_K, since
    dense also gets the hybrid configs run as dense kernels) and their minimum at every M, the
    feasible hybrid launch grid and its batched evaluators."""

    def __init__(self, tile, shape, dtype, dev):
        self.tile, self.shape, self.dtype, self.dev = tuple(tile), tuple(shape), dtype_key(dtype), dev
        self.n_n, self.n_k = grid_of(self.shape, self.tile)
        self.elt = ELT_BYTES[self.dtype]
        self.dense_model = CostModel.from_row_counts(np.zeros(self.n_n, dtype=np.int64), self.n_k, self.tile,
                                                     self.shape, self.dtype, dev)
        self.bns = [b for b in BLOCKS if tile[0] % b == 0]
        self.bks = [b for b in BLOCKS if tile[1] % b == 0][-3:]     # BLOCK_K 16 only when nothing larger fits
        self.launch = [(s, w, st) for s in HYBRID_GRID["split_k"] if s <= self.n_k
                       for w in HYBRID_GRID["num_warps"] for st in HYBRID_GRID["num_stages"]]
        self._hyb, self._dense, self._envelope, self._dense_grid, self._batches = {}, {}, {}, {}, {}
        self._dense_min: dict = {}

    def hybrid_params(self, bn, bk) -> list:
        """[(HybridCandidate, KernelParams)] of the per-M grid at BLOCK_N / BLOCK_K that fit the device."""
        if bn is None:
            return []
        if (bn, bk) not in self._hyb:
            out = [(HybridCandidate(bm, s, w, st), KernelParams(bm, bn, bk, s, w, st))
                   for bm in HYBRID_GRID["block_m"] for s, w, st in self.launch]
            self._hyb[(bn, bk)] = [(c, p) for c, p in out if occupancy(self.dev, p, self.elt, True) > 0]
        return self._hyb[(bn, bk)]

    def dense_curves(self, bn, bk) -> list:
        """Every feasible dense config: the cuBLAS-like family and the hybrid grid run as dense."""
        if (bn, bk) not in self._dense:
            params = dict.fromkeys(DENSE_CONFIGS + [p for _, p in self.hybrid_params(bn, bk)])
            curves = [self.dense_model.curve(p, hybrid=False) for p in params]
            self._dense[(bn, bk)] = [c for c in curves if c.feasible]
        return self._dense[(bn, bk)]

    def dense_envelope(self, bn, bk, m_max) -> list:
        """The dense curves that are the cheapest dense at some M in 1..m_max (exact: their minimum
        equals the minimum over all dense curves at every such M)."""
        key = (bn, bk, m_max)
        if key not in self._envelope:
            curves = self.dense_curves(bn, bk)
            self._envelope[key] = [curves[i] for i in sorted({i for _, _, i in lower_envelope(curves, m_max)})]
        return self._envelope[key]

    def dense_min(self, bn, bk, m_max) -> np.ndarray:
        """The cheapest dense time at every M in 1..m_max (m_max <= ``TABLE_MAX``): a running
        minimum over every dense curve, so exact."""
        key = (bn, bk, m_max)
        if key not in self._dense_min:
            ms = np.arange(1, m_max + 1)
            out = None
            for c in self.dense_curves(bn, bk):
                out = c(ms) if out is None else np.minimum(out, c(ms))
            self._dense_min[key] = out
        return self._dense_min[key]

    def dense_on_grid(self, bn, bk, m_max) -> np.ndarray:
        """The cheapest dense time on ``_grid(m_max)``."""
        key = (bn, bk, m_max)
        if key not in self._dense_grid:
            g = _grid(m_max)
            self._dense_grid[key] = (self.dense_min(bn, bk, m_max)[g - 1] if m_max <= TABLE_MAX else
                                     np.min(np.stack([c(g) for c in self.dense_envelope(bn, bk, m_max)]), axis=0))
        return self._dense_grid[key]

    def decode_batch(self, bn, bk) -> HybridBatch:
        """The BLOCK_M 16 configs at (BLOCK_N, BLOCK_K) that fit, at the decode M (``DECODE_M``)."""
        if ("decode", bn, bk) not in self._batches:
            params = [p for p in (KernelParams(16, bn, bk, s, w, st) for s, w, st in self.launch)
                      if occupancy(self.dev, p, self.elt, True) > 0]
            self._batches[("decode", bn, bk)] = HybridBatch(self.dense_model, params, DECODE_M)
        return self._batches[("decode", bn, bk)]

    def grid_batch(self, bn, bk, m_max) -> HybridBatch:
        """The hybrid grid at (BLOCK_N, BLOCK_K) on ``_grid(m_max)``."""
        if ("grid", bn, bk, m_max) not in self._batches:
            self._batches[("grid", bn, bk, m_max)] = HybridBatch(
                self.dense_model, [p for _, p in self.hybrid_params(bn, bk)], _grid(m_max))
        return self._batches[("grid", bn, bk, m_max)]


# ---- per tile map (through its per-row 2:4 counts): pack-time choices ---------------------------
class _Site:
    """The cost model and candidate curves of one tile map at its chosen BLOCK_N / BLOCK_K.  It
    reads the map only through the sorted per-row 2:4-tile counts (the balanced row order packs
    tile-rows by increasing count), so every map with the same counts shares one ``_Site``."""

    def __init__(self, shape: _Shape, n_sparse: np.ndarray):
        self.shape, self.dtype, self.dev = shape, shape.dtype, shape.dev
        self.model = CostModel.from_row_counts(n_sparse, shape.n_k, shape.tile, shape.shape, shape.dtype, shape.dev)
        self.block_n = self.block_k = None
        self.reason = ""
        self.plans: dict = {}
        if not int(n_sparse.sum()):
            self.reason = "no 2:4 tiles: a dense kernel is the hybrid kernel without the expansion"
        elif not shape.bns or not shape.bks:
            self.reason = f"tile {shape.tile} has no power-of-two BLOCK_N / BLOCK_K >= 16 dividing it"
        else:   # BLOCK_N / BLOCK_K minimising the decode time (largest blocks win ties)
            score = {}
            for bn, bk in itertools.product(shape.bns[::-1], shape.bks[::-1]):
                batch = shape.decode_batch(bn, bk)
                v = batch.evaluate(self.model) if batch.n else np.full((1, len(DECODE_M)), math.inf)
                score[(bn, bk)] = sum(float(v[:, i].min()) for i in range(len(DECODE_M)))
            self.block_n, self.block_k = min(score, key=score.get)
        self.dense_curves = shape.dense_curves(self.block_n, self.block_k)

    def hybrid_params(self):
        """[(HybridCandidate, KernelParams)] of the per-M grid at this weight's BLOCK_N / BLOCK_K."""
        return self.shape.hybrid_params(self.block_n, self.block_k)

    def dense_at(self, m):
        """(µs, KernelParams) of the cheapest dense config at M = m."""
        vals = [c.at(m) for c in self.dense_curves]
        i = int(np.argmin(vals))
        return vals[i], self.dense_curves[i].p


_SHAPES: dict = {}           # a few MiB each (the dense minimum on every M, batch index arrays)
_SITES: dict = {}


def _memo(cache: dict, key, make, limit: int):
    if key not in cache:
        if len(cache) >= limit:
            cache.clear()
        cache[key] = make()
    return cache[key]


def _site(tile_mask, dtype, device) -> tuple[_Site, torch.Tensor]:
    """(site, balanced row order) of a tile map.  ``tile_mask``: a TileMask or anything with
    ``tile_kind`` [nN, nK], ``tile`` and ``shape``.  Cached per (shape, tile, dtype, planning
    device, fp32 precision) and, below that, per sorted per-row 2:4 counts."""
    kind = torch.as_tensor(tile_mask.tile_kind).to(torch.uint8).cpu()
    dev = get_device(device)
    tile, shape = tuple(int(t) for t in tile_mask.tile), tuple(int(s) for s in tile_mask.shape)
    skey = (tile, shape, dtype_key(dtype), dev, torch.get_float32_matmul_precision())
    sh = _memo(_SHAPES, skey, lambda: _Shape(tile, shape, dtype, dev), 64)
    counts = kind.sum(1, dtype=torch.int64).numpy()
    site = _memo(_SITES, (skey, np.sort(counts).tobytes()), lambda: _Site(sh, np.sort(counts)), 4096)
    return site, balanced_row_order(kind)


# ---- public API --------------------------------------------------------------------------------
def choose_layout(tile_mask, m: int, dtype, device=None, n_alternatives: int = 8) -> TileLayout:
    """Best layout at M = m: hybrid (cheapest hybrid config) or dense when hybrid is not faster.

    ``dtype``: torch dtype or "bf16" / "fp16" / "fp32"; ``device``: a device name ("h200", ...),
    None for the current GPU / ``$PATCHC_DEVICE`` / h200.
    """
    if m < 1:
        raise ValueError(f"M must be >= 1, got {m}")
    site, row_order = _site(tile_mask, dtype, device)
    d_us, d_p = site.dense_at(m)
    hyb = sorted(((site.model.predict_us(m, p), c.to_dict() | dict(block_n=p.block_n, block_k=p.block_k), p)
                  for c, p in site.hybrid_params()), key=lambda r: r[0])
    dense_alt = (dict(strategy=DENSE, **d_p.to_dict()), d_us)
    common = dict(m=m, dtype=site.dtype, device=site.dev.name, dense_us=d_us, row_order=row_order)
    if hyb and hyb[0][0] < d_us:
        t, _, p = hyb[0]
        alts = (dense_alt,) + tuple((a, u) for u, a, _ in hyb[1:n_alternatives])
        return TileLayout("hybrid", **p.to_dict(), predicted_us=t, alternatives=alts,
                          reason=f"hybrid predicted {d_us / t:.2f}x faster than dense at M={m}",
                          breakdown=site.model.curve(p).breakdown(m), **common)
    reason = site.reason or (f"hybrid predicted {hyb[0][0] / d_us:.2f}x slower than dense at M={m}" if hyb
                             else "no hybrid kernel config fits on the device")
    alts = tuple((a, u) for u, a, _ in hyb[:n_alternatives])
    return TileLayout("dense", **d_p.to_dict(), predicted_us=d_us, alternatives=alts, reason=reason,
                      breakdown=site.model.curve(d_p, hybrid=False).breakdown(m), **common)


def candidate_us(tile_mask, m, candidate, dtype, device=None):
    """Predicted µs at M = m (an int, or an array of M) of a plan candidate: "dense" or a
    ``HybridCandidate`` at the weight's BLOCK_N / BLOCK_K.  The plan's own numbers, bit for bit."""
    site, _ = _site(tile_mask, dtype, device)
    if candidate == DENSE:
        curves = site.dense_curves
    else:
        c = candidate
        curves = [site.model.curve(KernelParams(c.block_m, site.block_n, site.block_k, c.split_k,
                                                c.num_warps, c.num_stages))]
    if np.ndim(m) == 0:
        return min(cv.at(int(m)) for cv in curves)
    return np.min(np.stack([cv(np.asarray(m)) for cv in curves]), axis=0)


@functools.lru_cache(maxsize=16)
def _grid(m_max: int) -> np.ndarray:
    """Every M up to 512 (decode / small batches), then ~3 % steps up to m_max (read-only)."""
    g = set(range(1, min(512, m_max) + 1))
    g.update(int(x) for x in np.geomspace(512, max(512, m_max), 200))
    g = np.array(sorted(x for x in g if x <= m_max), dtype=np.int64)
    g.flags.writeable = False
    return g


def _plan_ranges(site: _Site, m_max: int, max_hybrid: int) -> tuple[str, str, tuple]:
    """(strategy, reason, ranges) of ``plan_dispatch`` for a site (no per-weight data: memoised)."""
    sh = site.shape
    g = _grid(m_max)
    wt = np.diff(np.log(np.append(g, g[-1] + 1)))       # log-uniform in M: every octave counts the same
    dense = sh.dense_on_grid(site.block_n, site.block_k, m_max)
    hyb = site.hybrid_params()
    H = sh.grid_batch(site.block_n, site.block_k, m_max).evaluate(site.model) if hyb else np.empty((0, len(g)))
    best = np.minimum(dense, H.min(0)) if len(H) else dense
    chosen, cur = [], dense
    log_h = np.log(H / best) if len(H) else H
    while len(chosen) < max_hybrid and len(H):
        # mean log-regret of cur minus that of min(cur, H[i]); log(min(cur, H) / best) taken
        # elementwise from the two logs (the same floats, one np.log of H instead of one per round)
        log_cur = np.log(cur / best)
        gain = log_cur @ wt - np.where(H < cur, log_h, log_cur) @ wt
        i = int(np.argmax(gain))
        if gain[i] < 1e-3 * wt.sum():   # < 0.1 % mean improvement: not worth another kernel variant
            break
        chosen.append(i)
        cur = np.minimum(cur, H[i])
    if not chosen:     # no hybrid curve improves on dense anywhere: the envelope is all dense
        ranges = ((1, m_max, DENSE),)
    elif m_max <= TABLE_MAX:     # every M: the cheapest of dense and the chosen kernels (ties: dense,
        # then the earlier chosen), run-length encoded -- the exact thresholds by brute force
        ms = np.arange(1, m_max + 1)
        V = np.stack([sh.dense_min(site.block_n, site.block_k, m_max)]
                     + [site.model.curve(hyb[i][1])(ms) for i in chosen])
        win = np.argmin(V, axis=0)
        cut = np.flatnonzero(win[1:] != win[:-1]) + 1
        labels = [DENSE] + [hyb[i][0] for i in chosen]
        ranges = tuple((int(lo), int(hi), labels[win[lo - 1]])
                       for lo, hi in zip(np.concatenate([[1], cut + 1]), np.concatenate([cut, [m_max]])))
    else:                        # beyond the table: the exact piecewise-linear envelope
        envelope = sh.dense_envelope(site.block_n, site.block_k, m_max)
        labels = [DENSE] * len(envelope) + [hyb[i][0] for i in chosen]
        ranges = []
        for lo, hi, i in lower_envelope(envelope + [site.model.curve(hyb[i][1]) for i in chosen], m_max,
                                        shared=len(envelope)):
            if ranges and ranges[-1][2] == labels[i]:
                ranges[-1] = (ranges[-1][0], hi, labels[i])
            else:
                ranges.append((lo, hi, labels[i]))
        ranges = tuple(ranges)
    if all(c == DENSE for _, _, c in ranges):
        why = site.reason or (f"hybrid predicted slower than dense at every M in 1..{m_max} "
                              f"(best hybrid / dense at M=1: {H[:, 0].min() / dense[0]:.2f})" if len(H)
                              else "no hybrid kernel config fits on the device")
        return "dense", why, ((1, m_max, DENSE),)
    hyb_m = []
    for lo, hi, c in ranges:
        if c != DENSE:
            hyb_m = hyb_m[:-1] + [(hyb_m[-1][0], hi)] if hyb_m and hyb_m[-1][1] == lo - 1 else hyb_m + [(lo, hi)]
    why = (f"hybrid for M in {', '.join(f'{lo}..{hi}' for lo, hi in hyb_m[:4])}{' ...' if len(hyb_m) > 4 else ''}"
           f" ({dense[0] / cur[0]:.2f}x predicted at M=1); dense elsewhere")
    return "hybrid", why, ranges


def plan_dispatch(tile_mask, dtype, device=None, m_max: int = M_MAX, max_hybrid: int = MAX_HYBRID) -> DispatchPlan:
    """Compile-time M dispatch for one weight: at most ``max_hybrid`` hybrid candidates, chosen
    greedily to minimise the mean log-regret against the best config on a grid of M, then exact
    thresholds between them and dense from ``cost.lower_envelope``.

    Fast for many weights: everything that depends only on (shape, tile, dtype, device, fp32
    precision) -- the dense baseline, its envelope, the launch grid -- is computed once, and the
    rest depends on the tile map only through its sorted per-row 2:4 counts and is memoised on
    them; a new map of a known shape costs one batched evaluation of the hybrid grid."""
    if m_max < 1:
        raise ValueError(f"m_max must be >= 1, got {m_max}")
    site, row_order = _site(tile_mask, dtype, device)
    key = (m_max, max_hybrid)
    if key not in site.plans:
        site.plans[key] = _plan_ranges(site, m_max, max_hybrid)
    strategy, why, ranges = site.plans[key]
    return DispatchPlan(strategy, why, dtype=site.dtype, device=site.dev.name, shape=tuple(tile_mask.shape),
                        tile=tuple(tile_mask.tile), block_n=site.block_n or 0, block_k=site.block_k or 0,
                        row_order=row_order, m_max=m_max, ranges=ranges)


def planned_us(tile_mask, plan: DispatchPlan, m, device=None) -> np.ndarray:
    """Predicted µs at every M of ``m`` of the candidate ``plan`` selects there (the plan's own
    numbers; ``device``: the planning device, a name or spec)."""
    m = np.atleast_1d(np.asarray(m, dtype=np.int64))
    out = np.empty(len(m))
    for lo, hi, c in plan.ranges:
        sel = (m >= lo) & (m <= hi)
        if sel.any():
            out[sel] = candidate_us(tile_mask, m[sel], c, plan.dtype, device)
    rest = m > plan.m_max
    if rest.any():
        out[rest] = candidate_us(tile_mask, m[rest], plan.ranges[-1][2], plan.dtype, device)
    return out
