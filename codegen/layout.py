"""Tile layout choice: per weight BLOCK_N / BLOCK_K and tile-row order, per M the launch config.

Packing is once per weight, so BLOCK_N, BLOCK_K (dividing the mask tile) and the tile-row order
are chosen for the decode regime (M = 1 and 16), where hybrid pays.  Inside a packed tile-row
the 2:4 tiles come first, then the dense ones (``patchc.packing.pack`` does that); tile-rows are
ordered by decreasing dense-tile count (the most work first), so programs of equal work share a
wave; the kernel's store puts rows back (``row_order``).  Per M the cost model then picks
BLOCK_M, split-K, warps and stages -- or dense (cuBLAS-like ``torch.mm``) where hybrid would lose.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import torch

from patchc.packing import balanced_row_order

from .cost import CostModel, KernelParams, lower_envelope
from .devices import dtype_key, get_device

M_MAX = 65536
DECODE_M = (1, 16)            # the regime BLOCK_N / BLOCK_K are chosen for
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


# ---- per weight: pack-time choices -------------------------------------------------------------
class _Site:
    """The cost model and candidate curves of one weight at its chosen BLOCK_N / BLOCK_K."""

    def __init__(self, kind, tile, shape, dtype, device):
        self.dtype, self.dev = dtype_key(dtype), get_device(device)
        self.row_order = balanced_row_order(kind)
        self.model = CostModel(kind, tile, shape, self.dtype, self.dev, self.row_order)
        self.block_n = self.block_k = None
        self.reason = ""
        bns = [b for b in BLOCKS if tile[0] % b == 0]
        bks = [b for b in BLOCKS if tile[1] % b == 0][-3:]     # BLOCK_K 16 only when nothing larger fits
        if not int(kind.sum()):
            self.reason = "no 2:4 tiles: a dense kernel is the hybrid kernel without the expansion"
        elif not bns or not bks:
            self.reason = f"tile {tuple(tile)} has no power-of-two BLOCK_N / BLOCK_K >= 16 dividing it"
        else:   # BLOCK_N / BLOCK_K minimising the decode time (largest blocks win ties)
            score = {(bn, bk): sum(min(self.model.predict_us(m, KernelParams(16, bn, bk, s, w, st))
                                       for s, w, st in self._launch()) for m in DECODE_M)
                     for bn, bk in itertools.product(bns[::-1], bks[::-1])}
            self.block_n, self.block_k = min(score, key=score.get)
        self.dense_curves = [self.model.curve(p, hybrid=False) for p in dict.fromkeys(
            DENSE_CONFIGS + [p for _, p in self.hybrid_params()])]
        self.dense_curves = [c for c in self.dense_curves if c.feasible]

    def _launch(self):
        n_k = self.model.kind.shape[1]
        return [(s, w, st) for s in HYBRID_GRID["split_k"] if s <= n_k
                for w in HYBRID_GRID["num_warps"] for st in HYBRID_GRID["num_stages"]]

    def hybrid_params(self):
        """[(HybridCandidate, KernelParams)] of the per-M grid at this weight's BLOCK_N / BLOCK_K."""
        if self.block_n is None:
            return []
        out = [(HybridCandidate(bm, s, w, st), KernelParams(bm, self.block_n, self.block_k, s, w, st))
               for bm in HYBRID_GRID["block_m"] for s, w, st in self._launch()]
        return [(c, p) for c, p in out if self.model.curve(p).feasible]

    def dense_at(self, m):
        """(µs, KernelParams) of the cheapest dense config at M = m."""
        vals = [c.at(m) for c in self.dense_curves]
        i = int(np.argmin(vals))
        return vals[i], self.dense_curves[i].p


_SITES: dict = {}


def _site(tile_mask, dtype, device) -> _Site:
    """Cached per (tile map, dtype, planning device).  ``tile_mask``: a TileMask or anything with
    ``tile_kind`` [nN, nK], ``tile`` and ``shape``."""
    kind = torch.as_tensor(tile_mask.tile_kind).to(torch.uint8).cpu()
    dev = get_device(device)
    key = (tuple(tile_mask.tile), tuple(tile_mask.shape), kind.numpy().tobytes(), dtype_key(dtype),
           dev, torch.get_float32_matmul_precision())
    if key not in _SITES:
        if len(_SITES) > 256:
            _SITES.clear()
        _SITES[key] = _Site(kind, tuple(tile_mask.tile), tuple(tile_mask.shape), dtype, dev)
    return _SITES[key]


# ---- public API --------------------------------------------------------------------------------
def choose_layout(tile_mask, m: int, dtype, device=None, n_alternatives: int = 8) -> TileLayout:
    """Best layout at M = m: hybrid (cheapest hybrid config) or dense when hybrid is not faster.

    ``dtype``: torch dtype or "bf16" / "fp16" / "fp32"; ``device``: a device name ("h200", ...),
    None for the current GPU / ``$PATCHC_DEVICE`` / h200.
    """
    if m < 1:
        raise ValueError(f"M must be >= 1, got {m}")
    site = _site(tile_mask, dtype, device)
    d_us, d_p = site.dense_at(m)
    hyb = sorted(((site.model.predict_us(m, p), c.to_dict() | dict(block_n=p.block_n, block_k=p.block_k), p)
                  for c, p in site.hybrid_params()), key=lambda r: r[0])
    dense_alt = (dict(strategy=DENSE, **d_p.to_dict()), d_us)
    common = dict(m=m, dtype=site.dtype, device=site.dev.name, dense_us=d_us, row_order=site.row_order)
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
    site = _site(tile_mask, dtype, device)
    if candidate == DENSE:
        curves = site.dense_curves
    else:
        c = candidate
        curves = [site.model.curve(KernelParams(c.block_m, site.block_n, site.block_k, c.split_k,
                                                c.num_warps, c.num_stages))]
    if np.ndim(m) == 0:
        return min(cv.at(int(m)) for cv in curves)
    return np.min(np.stack([cv(np.asarray(m)) for cv in curves]), axis=0)


def _grid(m_max: int) -> np.ndarray:
    """Every M up to 512 (decode / small batches), then ~3 % steps up to m_max."""
    g = set(range(1, min(512, m_max) + 1))
    g.update(int(x) for x in np.geomspace(512, max(512, m_max), 200))
    return np.array(sorted(x for x in g if x <= m_max), dtype=np.int64)


def plan_dispatch(tile_mask, dtype, device=None, m_max: int = M_MAX, max_hybrid: int = MAX_HYBRID) -> DispatchPlan:
    """Compile-time M dispatch for one weight: at most ``max_hybrid`` hybrid candidates, chosen
    greedily to minimise the mean log-regret against the best config on a grid of M, then exact
    thresholds between them and dense from ``cost.lower_envelope``."""
    if m_max < 1:
        raise ValueError(f"m_max must be >= 1, got {m_max}")
    site = _site(tile_mask, dtype, device)
    base = dict(dtype=site.dtype, device=site.dev.name, shape=tuple(tile_mask.shape), tile=tuple(tile_mask.tile),
                block_n=site.block_n or 0, block_k=site.block_k or 0, row_order=site.row_order, m_max=m_max)
    g = _grid(m_max)
    wt = np.diff(np.log(np.append(g, g[-1] + 1)))       # log-uniform in M: every octave counts the same
    dense = np.min(np.stack([c(g) for c in site.dense_curves]), axis=0)
    hyb = site.hybrid_params()
    H = np.stack([site.model.curve(p)(g) for _, p in hyb]) if hyb else np.empty((0, len(g)))
    best = np.minimum(dense, H.min(0)) if len(H) else dense
    chosen, cur = [], dense
    while len(chosen) < max_hybrid and len(H):
        gain = np.log(cur / best) @ wt - np.log(np.minimum(cur, H) / best) @ wt
        i = int(np.argmax(gain))
        if gain[i] < 1e-3 * wt.sum():   # < 0.1 % mean improvement: not worth another kernel variant
            break
        chosen.append(i)
        cur = np.minimum(cur, H[i])
    curves = site.dense_curves + [site.model.curve(hyb[i][1]) for i in chosen]
    labels = [DENSE] * len(site.dense_curves) + [hyb[i][0] for i in chosen]
    ranges = []
    for lo, hi, i in lower_envelope(curves, m_max):
        if ranges and ranges[-1][2] == labels[i]:
            ranges[-1] = (ranges[-1][0], hi, labels[i])
        else:
            ranges.append((lo, hi, labels[i]))
    if all(c == DENSE for _, _, c in ranges):
        why = site.reason or (f"hybrid predicted slower than dense at every M in 1..{m_max} "
                              f"(best hybrid / dense at M=1: {H[:, 0].min() / dense[0]:.2f})" if len(H)
                              else "no hybrid kernel config fits on the device")
        return DispatchPlan("dense", why, ranges=((1, m_max, DENSE),), **base)
    hyb_m = []
    for lo, hi, c in ranges:
        if c != DENSE:
            hyb_m = hyb_m[:-1] + [(hyb_m[-1][0], hi)] if hyb_m and hyb_m[-1][1] == lo - 1 else hyb_m + [(lo, hi)]
    why = (f"hybrid for M in {', '.join(f'{lo}..{hi}' for lo, hi in hyb_m[:4])}{' ...' if len(hyb_m) > 4 else ''}"
           f" ({dense[0] / cur[0]:.2f}x predicted at M=1); dense elsewhere")
    return DispatchPlan("hybrid", why, ranges=tuple(ranges), **base)
