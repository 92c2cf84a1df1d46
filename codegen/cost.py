"""Analytic cost model of one linear ``Y[M, N] = X[M, K] · Wᵀ``: hybrid dense/2:4 kernel vs dense.

For a kernel config, ``T(M) = launch [+ split-K extras] + max(T_dram, T_l2, T_crit)``:
``T_dram``/``T_l2`` are bytes over achievable DRAM / L2 bandwidth (W once -- 2:4 tiles at 56.25 %
in 16-bit --, X, Y, the split-K fp32 workspace; re-reads of W and X through L2), after a DRAM
latency or two; ``T_crit`` is the sum over waves (``SMs x occupancy`` programs) of the slowest
program -- tile-rows with more dense tiles are slower at decode (the imbalance), the last wave
may be partial (the tail; the cuBLAS-like dense baseline balances it, stream-K style).  A
program costs its prologue plus ``max(memory, compute)``: bytes over its share of the SM's
bandwidth, at least ``latency / (stages - 1)`` per K-step (Little's law), vs ``tl.dot`` FLOPs
(2:4 tiles still cost dense FLOPs) plus the 2:4 expansion on the ALUs.  T is piecewise linear in
M (breaks at multiples of BLOCK_M and at the kinks of the max): ``lower_envelope`` finds the
cheapest of a set of curves on every integer M exactly.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .devices import DeviceSpec, dtype_key, get_device

ELT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
META_BYTES = 1 / 8    # 2 bits per kept value, 2 kept per group of 4: 1 bit per weight element


@dataclass(frozen=True)
class KernelParams:
    """Block sizes and launch parameters of one kernel (hybrid or dense)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def to_dict(self) -> dict:
        return asdict(self)


def occupancy(dev: DeviceSpec, p: KernelParams, elt: int, hybrid: bool) -> int:
    """Programs resident per SM (by shared memory, registers, warps); 0 when it does not fit."""
    smem = p.num_stages * (p.block_m + p.block_n) * p.block_k * elt + 1024   # pipelined X and W blocks
    threads = 32 * p.num_warps
    # fp32 accumulator + operand fragments of one 32-wide k chunk + (hybrid) the expanded tile
    regs = 32 + (p.block_m * p.block_n + (p.block_m + p.block_n) * 8 * elt
                 + hybrid * p.block_n * p.block_k * elt / 2) / threads
    if smem > dev.smem_per_block_kb * 1024 or regs > 255:
        return 0
    return min(int(dev.smem_per_sm_kb * 1024 // smem), dev.regs_per_sm // (8 * math.ceil(regs / 8) * threads),
               dev.max_warps_per_sm // p.num_warps, 32)


class Curve:
    """Predicted time (µs) of one kernel config as a function of M (vectorised over numpy M)."""

    def __init__(self, model: "CostModel", p: KernelParams, hybrid: bool):
        self.p, self.hybrid, self.bm, self.dev, self.e = p, hybrid, p.block_m, model.dev, model.elt
        dev, e, (n, k), s = model.dev, model.elt, model.shape, p.split_k
        self.occ = occupancy(dev, p, e, hybrid)
        self.feasible = self.occ > 0
        if not self.feasible:
            return
        self.s_steps, self.d_steps, self.n_blocks, self.w_bytes = model.programs(p, hybrid)
        self.L, self.C, self.sms = len(self.s_steps), dev.sm_count * self.occ, dev.sm_count
        self.lat = dev.mem_latency_ns * 1e-3
        self.sm_bw = dev.sm_bytes_per_clk * dev.clock_ghz * 1e3                 # bytes per µs
        self.mma_sm = model.tflops * 1e6 * dev.mma_eff / dev.sm_count           # FLOP per µs
        self.alu_sm = dev.alu_ops_per_clk * dev.clock_ghz * 1e3                 # lane-ops per µs
        self.t, self._rmq = {}, {}
        # bandwidth lines, µs = a + b * M: X and Y (+ split-K: zero & cast the fp32 workspace, its
        # atomics in L2); each N-block re-reads X and each M-block W through L2
        self.bw, self.l2 = dev.mem_bw_gbs * 1e3 * dev.bw_eff, dev.l2_bw_gbs * 1e3
        self.b1 = (k * e + n * e + (8 * n if s > 1 else 0)) / self.bw
        self.b2 = (self.n_blocks * k * e + n * e + (4 * s * n if s > 1 else 0)) / self.l2
        # the hybrid grid runs pid_n fastest: a W larger than half the L2 is re-read from DRAM per
        # M-block; cuBLAS rasterises tiles in swizzled groups, so its re-reads stay in L2
        self.spill = 1.0 if hybrid and self.w_bytes > dev.l2_mb * 2**20 / 2 else 0.0
        self.const = dev.launch_us + (dev.split_us if s > 1 else 0.0)
        # a program's first weight bytes arrive a DRAM latency after it starts; the hybrid kernel
        # first loads its tile-row offsets (one more latency).  DRAM streaming waits for it too.
        self.head = (2 if hybrid else 1) * self.lat

    def times(self, k: int) -> np.ndarray:
        """µs of every program (launch order within one M-block) when k programs share an SM.
        Loads are pipelined ahead of the math: a program takes its prologue plus the larger of its
        memory time and its compute time."""
        if k not in self.t:
            p, dev, e, lat = self.p, self.dev, self.e, self.lat
            bm, bn, bk, st = p.block_m, p.block_n, p.block_k, p.num_stages
            sm_bw = self.sm_bw / k                            # bytes per µs per program
            eff = 1.0 if k * p.num_warps >= 8 else 0.75   # one warp per scheduler issues ~3/4 of peak

            def mem(w):   # W + X through the SM, at least latency / (stages - 1) per step
                return max((w + bm * bk * e) / sm_bw, lat / (st - 1) if st > 1 else lat)
            mma = 2 * bm * bn * bk * k / (self.mma_sm * eff) + (dev.step_ns * 1e-3 if self.hybrid else 0.0)
            expand = bn * bk * dev.expand_ops * k / (self.alu_sm * eff)
            memory = self.s_steps * mem(bn * bk * (e / 2 + META_BYTES)) + self.d_steps * mem(bn * bk * e)
            compute = self.s_steps * (mma + expand) + self.d_steps * mma
            # prologue: first load (hybrid: the tile-row offsets first); epilogue: the output block
            head = self.head + bm * bn * (4 if p.split_k > 1 else e) / sm_bw
            self.t[k] = head + np.maximum(memory, compute)
        return self.t[k]

    # ---- T_crit: waves of the periodic program sequence ----------------------------------------
    def _waves(self, k):
        """[doubled program times, prefix sums of full-wave maxima (None when a wave holds all L
        program types; else their offsets repeat every q = L / gcd(L, C) waves), sparse table]."""
        if k not in self._rmq:
            t2 = np.concatenate([self.times(k), self.times(k)])
            win = None
            if self.C < self.L:
                q = self.L // math.gcd(self.L, self.C)
                maxima = np.lib.stride_tricks.sliding_window_view(t2, self.C)[(np.arange(q) * self.C) % self.L]
                win = np.concatenate([[0.0], np.cumsum(maxima.max(1))])
            self._rmq[k] = [t2, win, None]
        return self._rmq[k]

    def _last(self, k, a, ln):
        """max(t2[a : a + ln]) for arrays a, ln (via a sparse table)."""
        w = self._waves(k)
        if len(a) <= 8:   # a few: slices (max is exact, so the same floats as the table)
            return np.array([w[0][i:i + n].max() for i, n in zip(a, ln)])
        if w[2] is None:
            w[2] = [w[0]]
            while 2 ** len(w[2]) <= len(w[0]):
                h = 2 ** (len(w[2]) - 1)
                w[2].append(np.maximum(w[2][-1][:-h], w[2][-1][h:]))
        j = np.floor(np.log2(ln)).astype(np.int64)
        out = np.empty(len(a))
        for jj in np.unique(j):
            sel = j == jj
            out[sel] = np.maximum(w[2][jj][a[sel]], w[2][jj][a[sel] + ln[sel] - 2 ** jj])
        return out

    def crit_us(self, nm) -> np.ndarray:
        """Critical-path time of ``nm`` M-blocks: the sum over waves of the slowest program."""
        nm = np.atleast_1d(np.asarray(nm, dtype=np.int64))
        P = nm * self.L
        share = np.minimum(self.occ, -(-np.minimum(P, self.C) // self.sms))   # programs per busy SM
        full = -(-P // self.C) - 1                                             # waves before the last
        rest = P - full * self.C
        out = np.empty(len(nm))
        for k in np.unique(share):
            sel = share == k
            k = int(k)
            if not self.hybrid:        # cuBLAS-like (stream-K / persistent): no partial last wave
                out[sel] = float(self.times(k).max()) * np.maximum(P[sel] / self.C, 1.0)
                continue
            f, r = full[sel], rest[sel]
            last = self._last(k, (f * self.C) % self.L, np.minimum(r, self.L))
            win = self._waves(k)[1]
            if win is None:            # a wave covers every program type: full waves last tmax
                out[sel] = f * float(self.times(k).max()) + last
            else:
                q = len(win) - 1
                out[sel] = (f // q) * win[q] + win[f % q] + last
        return out

    # ---- the piecewise-linear form --------------------------------------------------------------
    def pieces(self, m):
        """Per M: (a1, b1), (a2, b2), c of T = const + max(a1 + b1 M, a2 + b2 M, c)."""
        m = np.atleast_1d(np.asarray(m, dtype=np.int64))
        nm = -(-m // self.bm)
        a1 = self.head + self.w_bytes * (1 + (nm - 1) * self.spill) / self.bw
        return a1, np.full(len(m), self.b1), nm * self.w_bytes / self.l2, np.full(len(m), self.b2), self.crit_us(nm)

    def __call__(self, m) -> np.ndarray:
        a1, b1, a2, b2, c = self.pieces(m := np.atleast_1d(np.asarray(m, dtype=np.int64)))
        return self.const + np.maximum(np.maximum(a1 + b1 * m, a2 + b2 * m), c)

    def at(self, m: int) -> float:
        return float(self([m])[0])

    def breakdown(self, m: int) -> dict:
        """The terms of T(m), for explain()."""
        a1, b1, a2, b2, c = (float(v[0]) for v in self.pieces([m]))
        nm = -(-m // self.bm)
        return dict(total_us=float(self(m)[0]), dram_us=a1 + b1 * m, l2_us=a2 + b2 * m, crit_us=c,
                    fixed_us=self.const, weight_bytes=int(self.w_bytes), programs=int(nm * self.L),
                    waves=-(-nm * self.L // self.C), occupancy=self.occ)


class CostModel:
    """The cost model for one weight's tile map on one device and dtype -- no packing needed.

    ``tile_kind`` is uint8 [nN, nK] (0 dense, 1 2:4) for an (N, K) weight cut into ``tile`` tiles;
    ``row_order`` the packed tile-row order (default: identity).  Curves are cached per config:
    ``CostModel(kind, tile, shape, "bf16", "h200").predict_us(m, KernelParams(...))``.
    """

    def __init__(self, tile_kind, tile, shape, dtype, device=None, row_order=None):
        self.kind = np.asarray(torch.as_tensor(tile_kind).cpu().numpy(), dtype=np.int64)
        self.tile, self.shape = tuple(int(t) for t in tile), tuple(int(s) for s in shape)
        self.dtype, self.dev = dtype_key(dtype), get_device(device)
        self.elt, self.tflops = ELT_BYTES[self.dtype], self.dev.tflops(self.dtype)
        order = np.arange(len(self.kind)) if row_order is None else np.asarray(torch.as_tensor(row_order).cpu())
        self.n_sparse = self.kind[order].sum(1)                                  # per packed tile-row
        self._curves, self._programs = {}, {}

    def programs(self, p: KernelParams, hybrid: bool):
        """Per program (s-major, then N-block): 2:4 and dense BLOCK_K steps; N-blocks; weight bytes."""
        key = (p.block_n, p.block_k, p.split_k, hybrid)
        if key in self._programs:
            return self._programs[key]
        (tn, tk), (n, k), e, s = self.tile, self.shape, self.elt, p.split_k
        if hybrid:   # tn / BLOCK_N N-blocks per tile-row; tiles padded to tn x tk; int32 K index each
            sp, total, steps = np.repeat(self.n_sparse, tn // p.block_n), self.kind.shape[1], tk // p.block_k
            n_sp = int(self.kind.sum())
            w_bytes = tn * tk * ((self.kind.size - n_sp) * e + n_sp * (e / 2 + META_BYTES)) + 4 * self.kind.size
        else:
            sp, total, steps, w_bytes = np.zeros(-(-n // p.block_n), dtype=np.int64), -(-k // p.block_k), 1, n * k * e
        s_rows, d_rows = [], []
        for j in range(s):   # render.py: slice j is tiles [total*j//S, total*(j+1)//S) of "2:4 then dense"
            t0, t1 = total * j // s, total * (j + 1) // s
            nsp = np.minimum(t1, sp) - np.minimum(t0, sp)
            s_rows.append(nsp * steps)
            d_rows.append((t1 - t0 - nsp) * steps)
        out = np.concatenate(s_rows).astype(float), np.concatenate(d_rows).astype(float), len(sp), float(w_bytes)
        self._programs[key] = out
        return out

    def curve(self, p: KernelParams, hybrid: bool = True) -> Curve:
        """The (cached) curve of one config, hybrid kernel or dense."""
        if (p, hybrid) not in self._curves:
            self._curves[(p, hybrid)] = Curve(self, p, hybrid)
        return self._curves[(p, hybrid)]

    def predict_us(self, m: int, p: KernelParams, hybrid: bool = True) -> float:
        """Predicted µs at M = m (inf for a config that does not fit on the device)."""
        c = self.curve(p, hybrid)
        return c.at(m) if c.feasible else math.inf


def _linear(c: Curve, lo: int, hi: int):
    """Exact (sympy) intercept and slope of a curve on [lo, hi], where it is linear."""
    import sympy
    a1, b1, a2, b2, cc = (float(v[0]) for v in c.pieces([lo]))     # same M-block count on [lo, hi]
    mid = (lo + hi) / 2                                           # no kink strictly inside: the max
    a, b = max([(a1, b1), (a2, b2), (cc, 0.0)], key=lambda ab: ab[0] + ab[1] * mid)   # term at mid holds
    return sympy.Rational(c.const) + sympy.Rational(a), sympy.Rational(b)


def lower_envelope(curves: list, m_max: int) -> list[tuple[int, int, int]]:
    """Ranges ``(m_lo, m_hi, i)`` covering 1..m_max where curve ``i`` is the cheapest (ties: lowest i).

    Every curve is linear between consecutive evaluation points (multiples of each BLOCK_M and
    the integers around every kink of a max), so the argmin only changes where it differs at two
    consecutive points; there the crossing of the two linear pieces is solved exactly (sympy).
    """
    import sympy
    pts = {1, m_max}
    for c in curves:
        mult = np.arange(c.bm, m_max + c.bm, c.bm)
        pts.update(np.minimum(np.concatenate([mult, mult + 1]), m_max).tolist())
        lo = mult - c.bm + 1
        a1, b1, a2, b2, cc = c.pieces(lo)
        with np.errstate(divide="ignore", invalid="ignore"):
            xs = [(a2 - a1) / (b1 - b2), (cc - a1) / b1, (cc - a2) / b2]
        for x in xs:
            ok = np.isfinite(x) & (x >= lo) & (x <= mult)
            f = np.floor(x[ok]).astype(np.int64)
            pts.update(np.clip(np.concatenate([f, f + 1]), 1, m_max).tolist())
    P = np.array(sorted(pts), dtype=np.int64)
    V = np.stack([c(P) for c in curves])
    best = np.argmin(V, axis=0)
    switches = []   # (m, new index), increasing m

    def solve(lo, hi, i, j, cand):    # argmin(lo) = i != j = argmin(hi); all curves linear on [lo, hi]
        if hi == lo + 1:
            switches.append((hi, j))
            return
        (ai, bi), (aj, bj) = _linear(curves[i], lo, hi), _linear(curves[j], lo, hi)
        x = (aj - ai) / (bi - bj) if bi != bj else sympy.Rational(lo + hi, 2)
        m0 = min(max(int(sympy.floor(x)), lo), hi - 1)
        k0, k1 = (cand[x] for x in np.argmin(np.stack([curves[c]([m0, m0 + 1]) for c in cand]), axis=0))
        if k0 != i:
            solve(lo, m0, i, k0, cand)
        if k1 != k0:
            solve(m0, m0 + 1, k0, k1, cand)
        if k1 != j:
            solve(m0 + 1, hi, k1, j, cand)

    for q in range(1, len(P)):
        i, j = int(best[q - 1]), int(best[q])
        if i != j:
            # a linear curve can undercut the (concave) envelope inside the piece only if its lower
            # end lies below the higher end of the two winners' values there
            top = max(V[i, q - 1], V[i, q], V[j, q - 1], V[j, q])
            cand = [k for k in range(len(curves)) if min(V[k, q - 1], V[k, q]) <= top]
            solve(int(P[q - 1]), int(P[q]), i, j, cand)
    ranges, start, cur = [], 1, int(best[0])
    for m, j in switches:
        ranges.append((start, m - 1, cur))
        start, cur = m, j
    ranges.append((start, m_max, cur))
    return ranges
