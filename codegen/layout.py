"""Per weight: the tile-row order and, per range of M, the kernel (or dense) that runs it.

Packing fixes only the tile and the tile-row order (tile-rows with the most dense tiles first,
so programs of equal work share a wave); everything else -- gemv or mma, blocks, warps, split-K
-- is chosen per M by the cost model (``cost``), among ``candidates``: the cheapest on a grid of
M (every M up to 512, then ~3 % steps), at most ``max_hybrid`` distinct kernels per weight
(greedy, minimising the mean log-regret against the best on the grid), dense where it wins.

``plan_dispatch`` returns a ``DispatchPlan``; ``choose_layout`` the answer at one M with the
alternatives it rejected.  Planning is memoised per (shape, tile, dtype, device) and, below that,
per sorted per-row 2:4 counts (all the model reads of a tile map).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from patchc.caches import BoundedCache
from patchc.packing import balanced_row_order

from .candidates import GEMV, MMA, SPLIT_BLOCKS, SPLITS, Candidate, with_split
from .cost import HybridModel, Prediction, Weight, dense_us, predict_dense
from .counts import get_counts
from .devices import dtype_key, get_device
from .spec import UnsupportedSpec

M_MAX = 65536
MAX_HYBRID = 3                # distinct hybrid kernels per site (each is a compiled variant)
DENSE = "dense"
HybridCandidate = Candidate   # the name the planner's consumers used


@dataclass(frozen=True, eq=False)
class TileLayout:
    """The cost model's answer for one weight at one M."""

    strategy: str                 # "hybrid" | "dense" at this M
    m: int
    dtype: str
    device: str
    candidate: object             # the chosen Candidate, or "dense"
    predicted_us: float           # of the chosen kernel
    dense_us: float               # cuBLAS-like dense, same model
    bound: float                  # dense bytes / packed bytes of this weight
    row_order: torch.Tensor       # int32 [nN], for patchc.packing.pack(..., row_order=)
    alternatives: tuple = ()      # rejected ((candidate dict, predicted_us), ...), cheapest first
    reason: str = ""
    breakdown: dict = field(default_factory=dict)

    @property
    def speedup(self) -> float:
        return self.dense_us / self.predicted_us

    def to_dict(self) -> dict:
        return dict(strategy=self.strategy, m=self.m, dtype=self.dtype, device=self.device,
                    candidate=self.candidate if self.candidate == DENSE else self.candidate.to_dict(),
                    predicted_us=self.predicted_us, dense_us=self.dense_us, bound=self.bound, reason=self.reason,
                    row_order=self.row_order.tolist(), breakdown=self.breakdown,
                    alternatives=[dict(params=p, predicted_us=t) for p, t in self.alternatives])


@dataclass(frozen=True, eq=False)
class DispatchPlan:
    """Per-M choice for one weight: sorted ``ranges`` of (m_lo, m_hi, candidate) covering 1..m_max,
    a candidate being a ``Candidate`` or ``"dense"``.  ``select(m)`` bisects the thresholds.
    ``block_n`` / ``block_k`` are the tile (kept for consumers that read a per-weight block)."""

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
        """``[(m_hi or None, params dict)]``: what ``runner.HybridRunner`` reads."""
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
                        DENSE if r["candidate"] == DENSE else Candidate.from_dict(r["candidate"]))
                       for r in d["ranges"])
        return cls(d["strategy"], d["reason"], dtype=d["dtype"], device=d["device"], shape=tuple(d["shape"]),
                   tile=tuple(d["tile"]), block_n=int(d["block_n"]), block_k=int(d["block_k"]),
                   row_order=torch.as_tensor(row_order, dtype=torch.int32), m_max=int(d["m_max"]), ranges=ranges)


@functools.lru_cache(maxsize=16)
def _grid(m_max: int) -> np.ndarray:
    """Every M up to 64 (decode / small batches), then ~5 % steps up to m_max (read-only)."""
    g = set(range(1, min(64, m_max) + 1))
    g.update(int(x) for x in np.geomspace(64, max(64, m_max), 140))
    g = np.array(sorted(x for x in g if x <= m_max), dtype=np.int64)
    g.flags.writeable = False
    return g


def candidates_for(shape, dtype, tile) -> list[Candidate]:
    """The candidates a weight can use (specs that validate), split-K variants of mma included."""
    out = []
    splits = [with_split(c, s) for c in MMA for s in SPLITS if s == 1 or (c.block_m, c.block_n) in SPLIT_BLOCKS]
    for c in GEMV + splits:
        try:
            c.spec(shape[0], shape[1], dtype, tile)
        except UnsupportedSpec:
            continue
        if c.split_k > -(-shape[1] // tile[1]):
            continue
        out.append(c)
    return out


class _Site:
    """The model of one tile map (through its sorted per-row counts) on one device: predictions
    per candidate and M, memoised."""

    def __init__(self, weight: Weight, dev):
        self.w, self.dev = weight, dev
        self.cands = candidates_for(weight.shape, weight.dtype, weight.tile)
        self._models: dict = {}
        self._dense: dict = {}
        self.plans: dict = {}

    def model(self, c: Candidate) -> HybridModel:
        if c not in self._models:
            lc = get_counts(c.spec(self.w.shape[0], self.w.shape[1], self.w.dtype, self.w.tile), int(self.dev.arch))
            self._models[c] = HybridModel(self.w, c, self.dev, lc)
        return self._models[c]

    def hybrid(self, c: Candidate, m: int) -> Prediction:
        return self.model(c).terms(m)

    def dense(self, m: int) -> Prediction:
        if m not in self._dense:
            self._dense[m] = predict_dense(self.w.shape, self.w.dtype, m, self.dev)
        return self._dense[m]

    def table(self, ms) -> tuple[np.ndarray, np.ndarray]:
        """([candidates, len(ms)] hybrid µs, [len(ms)] dense µs)."""
        H = np.array([self.model(c)(ms) for c in self.cands]).reshape(len(self.cands), len(ms))
        return H, self.dense_us(ms)

    def dense_us(self, ms) -> np.ndarray:
        return dense_us(self.w.shape, self.w.dtype, ms, self.dev)


_SITES = BoundedCache("cost-model sites", 4096)   # tile-map key -> _Site (a few MiB each at most)


def _site(tile_mask, dtype, device) -> tuple[_Site, torch.Tensor]:
    """(site, balanced row order) of a tile map (``tile_mask``: anything with ``tile_kind``, ``tile``
    and ``shape``); memoised per (shape, tile, dtype, device, sorted per-row 2:4 counts)."""
    kind = torch.as_tensor(tile_mask.tile_kind).to(torch.uint8).cpu()
    dev = get_device(device)
    order = balanced_row_order(kind)
    tile, shape = tuple(int(t) for t in tile_mask.tile), tuple(int(s) for s in tile_mask.shape)
    kp = kind[order.long()]
    key = (tile, shape, dtype_key(dtype), dev, kp.sum(1).numpy().tobytes(), kp[:, -1].numpy().tobytes(),
           order.numpy().tobytes() if shape[0] % tile[0] else b"", torch.get_float32_matmul_precision())
    site = _SITES.get_or_compute(key, lambda: _Site(Weight(kind, shape, tile, dtype, order), dev))
    return site, order


def choose_layout(tile_mask, m: int, dtype, device=None, n_alternatives: int = 8) -> TileLayout:
    """Best kernel at M = m: the cheapest generated kernel, or dense when it is not faster.

    ``dtype``: torch dtype or "bf16" / "fp16" / "fp32"; ``device``: a device name ("h200", ...),
    None for the current GPU / ``$PATCHC_DEVICE`` / h200.
    """
    if m < 1:
        raise ValueError(f"M must be >= 1, got {m}")
    site, order = _site(tile_mask, dtype, device)
    d = site.dense(m)
    hyb = sorted(((site.hybrid(c, m), c) for c in site.cands), key=lambda r: r[0].us)
    common = dict(m=m, dtype=site.w.dtype, device=site.dev.name, dense_us=d.us, bound=site.w.bound(), row_order=order)
    dense_alt = (dict(strategy=DENSE), d.us)
    if hyb and math.isfinite(hyb[0][0].us) and hyb[0][0].us < d.us and site.w.frac > 0:
        best, c = hyb[0]
        alts = (dense_alt,) + tuple((cc.to_dict(), p.us) for p, cc in hyb[1:n_alternatives])
        return TileLayout("hybrid", candidate=c, predicted_us=best.us, alternatives=alts,
                          reason=f"{c.label()} predicted {d.us / best.us:.2f}x faster than dense at M={m}",
                          breakdown=best.to_dict(), **common)
    if site.w.frac == 0:
        reason = "no 2:4 tiles: the dense kernel is the hybrid kernel without savings"
    elif not hyb or not math.isfinite(hyb[0][0].us):
        reason = "no generated kernel fits on the device"
    else:
        reason = f"best kernel ({hyb[0][1].label()}) predicted {hyb[0][0].us / d.us:.2f}x slower than dense at M={m}"
    alts = tuple((cc.to_dict(), p.us) for p, cc in hyb[:n_alternatives])
    return TileLayout("dense", candidate=DENSE, predicted_us=d.us, alternatives=alts, reason=reason,
                      breakdown=d.to_dict(), **common)


def _sm_load(p: Prediction) -> float:
    """The busiest SM resource's µs (not DRAM): what is left of a kernel's headroom under DRAM."""
    return max(v for k, v in p.terms.items() if k.endswith("_us") and k not in ("dram_us", "fixed_us"))


def _plan_ranges(site: _Site, m_max: int, max_hybrid: int) -> tuple[str, str, tuple]:
    g = _grid(m_max)
    wt = np.diff(np.log(np.append(g, g[-1] + 1)))       # log-uniform in M: every octave counts the same
    H, D = site.table(g)
    if site.w.frac == 0 or not len(H) or not np.isfinite(H).any():
        why = ("no 2:4 tiles: the dense kernel is the hybrid kernel without savings" if site.w.frac == 0
               else "no generated kernel fits on the device")
        return "dense", why, ((1, m_max, DENSE),)
    best = np.minimum(D, H.min(0))
    chosen, cur = [], D.copy()
    with np.errstate(divide="ignore", invalid="ignore"):
        log_h = np.log(H / best)
        while len(chosen) < max_hybrid:
            log_cur = np.log(cur / best)
            gain = log_cur @ wt - np.where(H < cur, log_h, log_cur) @ wt
            gain[~np.isfinite(gain)] = -np.inf
            i = int(np.argmax(gain))
            if gain[i] < 1e-3 * wt.sum():    # < 0.1 % mean improvement: not worth another kernel variant
                break
            chosen.append(i)
            cur = np.minimum(cur, H[i])
        # decode (M = 1) is the most common M: when a free slot is left and the chosen miss the best
        # kernel there, add the one of the (near-)best at M = 1 that gains most over the grid
        near = np.flatnonzero(H[:, 0] <= H[:, 0].min() * (1 + 1e-3))
        if chosen and len(chosen) < max_hybrid and cur[0] > H[:, 0].min() * (1 + 1e-4) and len(near):
            log_cur = np.log(cur / best)
            gain = log_cur @ wt - np.where(H[near] < cur, log_h[near], log_cur) @ wt
            tied = near[gain >= gain.max() - 1e-6 * wt.sum()]
            i = int(min(tied, key=lambda j: _sm_load(site.hybrid(site.cands[j], 1))))   # the most headroom
            chosen.append(i)
            cur = np.minimum(cur, H[i])
    if not chosen:
        return "dense", (f"every generated kernel predicted slower than dense at every M in 1..{m_max} "
                         f"(best at M=1: {H[:, 0].min() / D[0]:.2f}x dense's time)"), ((1, m_max, DENSE),)
    labels = [DENSE] + [site.cands[i] for i in chosen]
    cost = lambda ms: np.stack([site.dense_us(ms)] + [site.model(c)(ms) for c in labels[1:]])  # noqa: E731
    win = np.argmin(np.stack([D] + [H[i] for i in chosen]), axis=0)   # ties: dense, then the earlier chosen
    # every M between two grid points where the winner changes: the cheapest of the chosen there
    pts, who = [int(g[0])], [int(win[0])]
    for q in range(1, len(g)):
        if win[q] != win[q - 1] and g[q] > g[q - 1] + 1:
            ms = np.arange(g[q - 1] + 1, g[q])
            w = np.argmin(cost(ms), axis=0)
            pts += ms.tolist()
            who += w.tolist()
        pts.append(int(g[q]))
        who.append(int(win[q]))
    ranges, start = [], 1
    for q in range(len(pts)):
        if q + 1 == len(pts) or who[q + 1] != who[q]:
            hi = pts[q] if q + 1 < len(pts) else m_max
            if ranges and ranges[-1][2] == labels[who[q]]:
                ranges[-1] = (ranges[-1][0], hi, labels[who[q]])
            else:
                ranges.append((start, hi, labels[who[q]]))
            start = hi + 1
    hyb_m = [(lo, hi) for lo, hi, c in ranges if c != DENSE]
    why = (f"hybrid for M in {', '.join(f'{lo}..{hi}' for lo, hi in hyb_m[:4])}{' ...' if len(hyb_m) > 4 else ''}"
           f" ({D[0] / cur[0]:.2f}x predicted at M=1, bound {site.w.bound():.2f}x); dense elsewhere")
    return "hybrid", why, tuple(ranges)


def plan_dispatch(tile_mask, dtype, device=None, m_max: int = M_MAX, max_hybrid: int = MAX_HYBRID) -> DispatchPlan:
    """Compile-time M dispatch for one weight: at most ``max_hybrid`` generated kernels, chosen
    greedily to minimise the mean log-regret against the best candidate on a grid of M, dense where
    it is cheaper (see the module docstring)."""
    if m_max < 1:
        raise ValueError(f"m_max must be >= 1, got {m_max}")
    site, order = _site(tile_mask, dtype, device)
    key = (m_max, max_hybrid)
    if key not in site.plans:
        site.plans[key] = _plan_ranges(site, m_max, max_hybrid)
    strategy, why, ranges = site.plans[key]
    return DispatchPlan(strategy, why, dtype=site.w.dtype, device=site.dev.name, shape=tuple(tile_mask.shape),
                        tile=tuple(tile_mask.tile), block_n=int(tile_mask.tile[0]), block_k=int(tile_mask.tile[1]),
                        row_order=order, m_max=m_max, ranges=ranges)


def candidate_us(tile_mask, m, candidate, dtype, device=None):
    """Predicted µs at M = m (an int, or an array of M) of a plan candidate ("dense" or a Candidate)."""
    site, _ = _site(tile_mask, dtype, device)
    if candidate == DENSE:
        f = lambda mm: site.dense_us(np.atleast_1d(mm))  # noqa: E731
    else:
        f = site.model(candidate)
    return float(f(m)[0]) if np.ndim(m) == 0 else f(np.asarray(m))


def planned_us(tile_mask, plan: DispatchPlan, m, device=None) -> np.ndarray:
    """Predicted µs at every M of ``m`` of the candidate ``plan`` selects there (the plan's own numbers;
    ``device``: the planning device, a name or spec)."""
    m = np.atleast_1d(np.asarray(m, dtype=np.int64))
    out = np.empty(len(m))
    choice = [plan.select(int(mm)) for mm in m]
    for c in dict.fromkeys(choice):
        sel = np.array([x == c for x in choice])
        out[sel] = candidate_us(tile_mask, m[sel], c, plan.dtype, device)
    return out
