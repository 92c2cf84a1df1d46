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

from patchc.dtypes import ELT_BYTES

from .devices import DeviceSpec, dtype_key, get_device

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


# ---- what a generated hybrid kernel needs on the SM (fitted to ptxas, sm_90, Triton 3.7.1) ----------
# Measured by AOT-compiling the rendered kernels for sm_90 (``GeneratedKernel.resources``: ptxas -v
# registers / spill stores, Triton's shared memory) over BLOCK_M 16-128 x BLOCK_N 16-128 x BLOCK_K
# 32-128 x 4 / 8 warps x 2-6 stages (bf16, fp16, fp32 "ieee" and "tf32"; 11008x4096, 128x128 tiles):
# * shared memory, 16-bit: (stages - 1) x the two gathered 2:4 value blocks (2 BN BK e) + the MMA
#   operands (BM + BN) BK e -- e.g. 32x128x128 at 3 stages 172032 B; fp32 (FMA or tf32 dots) is not
#   pipelined through shared memory: (BM + 4 BN) BK 4 at any stage count;
# * registers, 16-bit: a thread holds about (BM BN + BM BK + 3/4 BN BK) / threads elements; every
#   config above 148 spilled (32x128x128 at 4 warps: 152, 68 B spilled; 128x64x64: 152, 104 B) and
#   every one at or below fitted (64x128x64 at 4 warps: 144, 255 registers, no spill) -- 128x128x128
#   at 8 warps (176, 214 registers) is the one fitting config the bound leaves out;
# * registers, fp32 "ieee" (CUDA-core FMA dot): the product of a thread's X and W fragments,
#   (BM BK / threads) (BN BK / threads), at most 64 (16x64x64 at 4 warps: 256, 584 B spilled;
#   16x128x32: 128 fits; 32x64x32: 128 spills 32 B -- so 64); "tf32" dots use the 16-bit bound with
#   the fragments counted at 4 bytes;
# * two ptxas quirks at exactly 128 registers with 8 warps: 16x128x128 16-bit at 3 stages (8 B
#   spilled; 2, 4, 5 and 6 stages do not spill) and 64x32x32 fp32 "ieee" at 3 stages (8 B).
REG_BOUND_16BIT = 148
FRAGMENT_BOUND_FP32 = 64
KNOWN_SPILLS = {("16bit", 16, 128, 128, 8, 3), ("ieee", 64, 32, 32, 8, 3)}


def _dot_kind(elt: int) -> str:
    if elt != 4:
        return "16bit"
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def hybrid_smem_bytes(p: KernelParams, elt: int) -> int:
    """Shared memory of a generated hybrid kernel (Triton's allocation, to within 4 bytes)."""
    if elt == 4:
        return (p.block_m + 4 * p.block_n) * p.block_k * 4
    return ((p.num_stages - 1) * 2 * p.block_n + p.block_m + p.block_n) * p.block_k * elt


def hybrid_spills(p: KernelParams, elt: int) -> bool:
    """Whether a generated hybrid kernel would spill registers (so the planner never picks it)."""
    kind, t = _dot_kind(elt), 32 * p.num_warps
    if (kind, p.block_m, p.block_n, p.block_k, p.num_warps, p.num_stages) in KNOWN_SPILLS:
        return True
    if kind == "ieee":
        return (p.block_m * p.block_k / t) * (p.block_n * p.block_k / t) > FRAGMENT_BOUND_FP32
    scale = elt / 2
    live = (p.block_m * p.block_n + scale * (p.block_m * p.block_k + 0.75 * p.block_n * p.block_k)) / t
    return live > REG_BOUND_16BIT


def occupancy(dev: DeviceSpec, p: KernelParams, elt: int, hybrid: bool) -> int:
    """Programs resident per SM (by shared memory, registers, warps); 0 when it does not fit --
    for a generated hybrid kernel also when it would spill registers."""
    if hybrid:
        if hybrid_spills(p, elt):
            return 0
        smem = hybrid_smem_bytes(p, elt) + 1024
    else:     # the cuBLAS-like dense baseline: pipelined X and W blocks
        smem = p.num_stages * (p.block_m + p.block_n) * p.block_k * elt + 1024
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
        self.t, self._rmq, self._tmax, self._win, self._at, self._c1 = {}, {}, {}, {}, {}, None
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

    def coeffs(self, k: int) -> tuple:
        """(head, mem_24, mem_dense, compute_24, compute_dense): a program's time is
        ``head + max(s * mem_24 + d * mem_dense, s * compute_24 + d * compute_dense)`` for its s 2:4
        and d dense BLOCK_K steps, when k programs share an SM.  Loads are pipelined ahead of the
        math: a program takes its prologue plus the larger of its memory and its compute time."""
        p, dev, e, lat = self.p, self.dev, self.e, self.lat
        bm, bn, bk, st = p.block_m, p.block_n, p.block_k, p.num_stages
        sm_bw = self.sm_bw / k                            # bytes per µs per program
        eff = 1.0 if k * p.num_warps >= 8 else 0.75   # one warp per scheduler issues ~3/4 of peak
        floor = lat / (st - 1) if st > 1 else lat         # W + X through the SM, >= latency / (stages - 1) per step
        mem_s = max((bn * bk * (e / 2 + META_BYTES) + bm * bk * e) / sm_bw, floor)
        mem_d = max((bn * bk * e + bm * bk * e) / sm_bw, floor)
        mma = 2 * bm * bn * bk * k / (self.mma_sm * eff) + (dev.step_ns * 1e-3 if self.hybrid else 0.0)
        expand = bn * bk * dev.expand_ops * k / (self.alu_sm * eff)
        # prologue: first load (hybrid: the tile-row offsets first); epilogue: the output block
        head = self.head + bm * bn * (4 if p.split_k > 1 else e) / sm_bw
        return head, mem_s, mem_d, mma + expand, mma

    def times(self, k: int) -> np.ndarray:
        """µs of every program (launch order within one M-block) when k programs share an SM."""
        if k not in self.t:
            head, ms, md, cs, cd = self.coeffs(k)
            self.t[k] = head + np.maximum(self.s_steps * ms + self.d_steps * md, self.s_steps * cs + self.d_steps * cd)
        return self.t[k]

    def tmax(self, k: int) -> float:
        """The slowest program when k share an SM."""
        if k not in self._tmax:
            self._tmax[k] = float(self.times(k).max())
        return self._tmax[k]

    # ---- T_crit: waves of the periodic program sequence ----------------------------------------
    def _table(self, k):
        """Sparse table of range maxima over the doubled program times (cyclic windows)."""
        if k not in self._rmq:
            t2 = np.concatenate([self.times(k), self.times(k)])
            levels = [t2]
            while 2 ** len(levels) <= len(t2):
                h = 2 ** (len(levels) - 1)
                levels.append(np.maximum(levels[-1][:-h], levels[-1][h:]))
            self._rmq[k] = levels
        return self._rmq[k]

    def _last(self, k, a, ln):
        """max(t2[a : a + ln]) for arrays a, ln (ln <= L): slices for a few, else the sparse table."""
        if len(a) <= 8:   # a few: slices (max is exact, so the same floats as the table)
            t2 = self._rmq[k][0] if k in self._rmq else np.concatenate([self.times(k), self.times(k)])
            return np.array([t2[i:i + n].max() for i, n in zip(a, ln)])
        levels = self._table(k)
        j = np.floor(np.log2(ln)).astype(np.int64)
        out = np.empty(len(a))
        for jj in np.unique(j):
            sel = j == jj
            out[sel] = np.maximum(levels[jj][a[sel]], levels[jj][a[sel] + ln[sel] - 2 ** jj])
        return out

    def _waves(self, k):
        """Prefix sums of full-wave maxima (None when a wave holds all L program types; else their
        offsets repeat every q = L / gcd(L, C) waves)."""
        if k not in self._win:
            win = None
            if self.C < self.L:
                q = self.L // math.gcd(self.L, self.C)
                maxima = self._last(k, (np.arange(q) * self.C) % self.L, np.full(q, self.C))
                win = np.concatenate([[0.0], np.cumsum(maxima)])
            self._win[k] = win
        return self._win[k]

    def crit_us(self, nm) -> np.ndarray:
        """Critical-path time of ``nm`` M-blocks: the sum over waves of the slowest program."""
        nm = np.atleast_1d(np.asarray(nm, dtype=np.int64))
        if len(nm) > 16:        # grids repeat M-block counts: compute each once
            step = nm[1:] != nm[:-1]
            if (nm[1:] >= nm[:-1]).all():          # sorted (M grids are): unique without a sort
                inv = np.concatenate([[0], np.cumsum(step)])
                u = nm[np.concatenate([[0], np.flatnonzero(step) + 1])]
            else:
                u, inv = np.unique(nm, return_inverse=True)
            if len(u) < len(nm):
                return self._crit(u)[inv.reshape(-1)]
        return self._crit(nm)

    def _crit(self, nm) -> np.ndarray:
        P = nm * self.L
        share = np.minimum(self.occ, -(-np.minimum(P, self.C) // self.sms))   # programs per busy SM
        out = np.empty(len(nm))
        if not self.hybrid:            # cuBLAS-like (stream-K / persistent): no partial last wave
            for k in np.unique(share):
                sel = share == k
                out[sel] = self.tmax(int(k)) * np.maximum(P[sel] / self.C, 1.0)
            return out
        # fewer programs than SMs x occupancy: one wave, every program type in it -> the slowest
        low = share < self.occ
        for k in np.unique(share[low]) if low.any() else ():
            out[share == k] = self.tmax(int(k))
        sel = ~low
        if sel.any():
            k = self.occ
            p_ = P[sel]
            f = -(-p_ // self.C) - 1                                           # waves before the last
            r = p_ - f * self.C
            last = self._last(k, (f * self.C) % self.L, np.minimum(r, self.L))
            win = self._waves(k)
            if win is None:            # a wave covers every program type: full waves last tmax
                out[sel] = f * self.tmax(k) + last
            else:
                q = len(win) - 1
                out[sel] = (f // q) * win[q] + win[f % q] + last
        return out

    def k1(self) -> int:
        """Programs per busy SM with one M-block (what ``crit1`` reads ``times`` at)."""
        return int(min(self.occ, -(-min(self.L, self.C) // self.sms)))

    def crit1(self) -> float:
        """``crit_us(1)`` (one M-block: every decode M up to BLOCK_M), cached: the blocks of C
        programs in launch order, each as slow as its slowest, one after the other."""
        if self._c1 is None:
            share = self.k1()
            if not self.hybrid:
                self._c1 = self.tmax(share) * max(self.L / self.C, 1.0)
            elif self.C < self.L:
                t = self.times(self.occ)
                self._c1 = float(np.cumsum(np.maximum.reduceat(t, np.arange(0, self.L, self.C)))[-1])
            else:
                self._c1 = self.tmax(share)
        return self._c1

    # ---- the piecewise-linear form --------------------------------------------------------------
    def pieces(self, m):
        """Per M: (a1, b1), (a2, b2), c of T = const + max(a1 + b1 M, a2 + b2 M, c)."""
        m = np.atleast_1d(np.asarray(m, dtype=np.int64))
        nm = -(-m // self.bm)
        a1 = self.head + self.w_bytes * (1 + (nm - 1) * self.spill) / self.bw
        return a1, np.full(len(m), self.b1), nm * self.w_bytes / self.l2, np.full(len(m), self.b2), self.crit_us(nm)

    def __call__(self, m) -> np.ndarray:
        m = np.atleast_1d(np.asarray(m, dtype=np.int64))
        nm = -(-m // self.bm)
        # the floats of pieces(): without the DRAM re-read term, 1 + (nm - 1) * 0.0 is 1.0
        a1 = (self.head + self.w_bytes * (1 + (nm - 1) * self.spill) / self.bw if self.spill
              else self.head + self.w_bytes * 1.0 / self.bw)
        return self.const + np.maximum(np.maximum(a1 + self.b1 * m, nm * self.w_bytes / self.l2 + self.b2 * m),
                                       self.crit_us(nm))

    def at(self, m: int) -> float:
        """T(m) for one int m (the same float as ``self([m])[0]``), memoised."""
        v = self._at.get(m)
        if v is None:
            nm = -(-m // self.bm)
            if nm == 1:
                a1 = self.head + self.w_bytes * (1 + (nm - 1) * self.spill) / self.bw
                a2 = nm * self.w_bytes / self.l2
                v = self.const + max(max(a1 + self.b1 * m, a2 + self.b2 * m), self.crit1())
            else:
                v = float(self([m])[0])
            self._at[m] = v
        return v

    def breakdown(self, m: int) -> dict:
        """The terms of T(m), for explain()."""
        a1, b1, a2, b2, c = (float(v[0]) for v in self.pieces([m]))
        nm = -(-m // self.bm)
        return dict(total_us=float(self(m)[0]), dram_us=a1 + b1 * m, l2_us=a2 + b2 * m, crit_us=c,
                    fixed_us=self.const, weight_bytes=int(self.w_bytes), programs=int(nm * self.L),
                    waves=-(-nm * self.L // self.C), occupancy=self.occ)


def _slices(total: int, s: int):
    """render.py: K slice j of a split-K program is tiles [total*j//s, total*(j+1)//s) of its
    tile list (2:4 tiles first, then dense); as [s, 1] arrays (t0, t1)."""
    j = np.arange(s)[:, None]
    return total * j // s, total * (j + 1) // s


class CostModel:
    """The cost model for one weight's tile map on one device and dtype -- no packing needed.

    ``tile_kind`` is uint8 [nN, nK] (0 dense, 1 2:4) for an (N, K) weight cut into ``tile`` tiles;
    ``row_order`` the packed tile-row order (default: identity).  Curves are cached per config:
    ``CostModel(kind, tile, shape, "bf16", "h200").predict_us(m, KernelParams(...))``.
    The model reads the tile map only through the 2:4-tile count of every packed tile-row
    (``from_row_counts`` builds it from those alone); dense curves do not read it at all.
    """

    def __init__(self, tile_kind, tile, shape, dtype, device=None, row_order=None):
        kind = np.asarray(torch.as_tensor(tile_kind).cpu().numpy(), dtype=np.int64)
        order = np.arange(len(kind)) if row_order is None else np.asarray(torch.as_tensor(row_order).cpu())
        self._setup(kind[order].sum(1), kind.shape[1], tile, shape, dtype, device)

    @classmethod
    def from_row_counts(cls, n_sparse, n_k: int, tile, shape, dtype, device=None) -> "CostModel":
        """The model of any tile map whose packed tile-rows hold ``n_sparse[i]`` 2:4 tiles of ``n_k``."""
        self = cls.__new__(cls)
        self._setup(np.asarray(n_sparse, dtype=np.int64), n_k, tile, shape, dtype, device)
        return self

    def _setup(self, n_sparse, n_k, tile, shape, dtype, device):
        self.tile, self.shape = tuple(int(t) for t in tile), tuple(int(s) for s in shape)
        self.dtype, self.dev = dtype_key(dtype), get_device(device)
        self.elt, self.tflops = ELT_BYTES[self.dtype], self.dev.tflops(self.dtype)
        self.n_sparse = n_sparse                                                 # per packed tile-row
        self.n_k, self.n_tiles, self.n_sp_total = int(n_k), len(n_sparse) * int(n_k), int(n_sparse.sum())
        self._curves, self._programs = {}, {}

    def programs(self, p: KernelParams, hybrid: bool):
        """Per program (s-major, then N-block): 2:4 and dense BLOCK_K steps; N-blocks; weight bytes."""
        key = (p.block_n, p.block_k, p.split_k, hybrid)
        if key in self._programs:
            return self._programs[key]
        (tn, tk), (n, k), e, s = self.tile, self.shape, self.elt, p.split_k
        if hybrid:   # tn / BLOCK_N N-blocks per tile-row, each with its tile-row's steps
            s_rows, d_rows, w_bytes = self.row_steps(p)
            rep = tn // p.block_n
            out = (np.repeat(s_rows.reshape(s, -1), rep, axis=1).ravel(),
                   np.repeat(d_rows.reshape(s, -1), rep, axis=1).ravel(), len(self.n_sparse) * rep, w_bytes)
        else:
            nsp, steps, (t0, t1) = np.zeros((s, -(-n // p.block_n)), dtype=np.int64), 1, _slices(-(-k // p.block_k), s)
            out = ((nsp * steps).ravel().astype(float), ((t1 - t0 - nsp) * steps).ravel().astype(float),
                   nsp.shape[1], float(n * k * e))
        self._programs[key] = out
        return out

    def row_steps(self, p: KernelParams):
        """(2:4 steps, dense steps) of the hybrid programs of every (K slice, packed tile-row),
        s-major -- ``programs`` repeats each tn / BLOCK_N times -- and the weight bytes."""
        (tn, tk), e = self.tile, self.elt
        t0, t1 = _slices(self.n_k, p.split_k)
        nsp = np.minimum(t1, self.n_sparse) - np.minimum(t0, self.n_sparse)   # [s, tile-rows]
        steps = tk // p.block_k
        n_sp = self.n_sp_total   # tiles padded to tn x tk; an int32 K index each
        w_bytes = tn * tk * ((self.n_tiles - n_sp) * e + n_sp * (e / 2 + META_BYTES)) + 4 * self.n_tiles
        return (nsp * steps).ravel().astype(float), ((t1 - t0 - nsp) * steps).ravel().astype(float), float(w_bytes)

    def curve(self, p: KernelParams, hybrid: bool = True) -> Curve:
        """The (cached) curve of one config, hybrid kernel or dense."""
        if (p, hybrid) not in self._curves:
            self._curves[(p, hybrid)] = Curve(self, p, hybrid)
        return self._curves[(p, hybrid)]

    def predict_us(self, m: int, p: KernelParams, hybrid: bool = True) -> float:
        """Predicted µs at M = m (inf for a config that does not fit on the device)."""
        c = self.curve(p, hybrid)
        return c.at(m) if c.feasible else math.inf


class HybridBatch:
    """``np.stack([model.curve(p)(m) for p in params])`` for many hybrid configs at once, for any
    tile map of one (shape, tile, dtype, device) -- bit for bit the same floats as the curves.

    Everything that does not read the tile map (occupancy, waves, which programs-per-SM values and
    which cyclic windows of the program sequence each M-block count needs, the per-program time
    coefficients) is worked out once here from ``template`` (any model of that shape); ``evaluate``
    then costs a few array operations per program layout (BLOCK_N, BLOCK_K, split-K) instead of a
    few dozen per config: what makes planning a new weight of a known shape cheap.
    """

    def __init__(self, template: "CostModel", params, m):
        self.m = np.asarray(m, dtype=np.int64)
        curves = [template.curve(p) for p in params]
        if not all(c.feasible for c in curves):
            raise ValueError("HybridBatch takes feasible hybrid configs only")
        self.params, c0 = list(params), curves[0] if curves else None
        self.n = len(curves)
        if not curves:
            return
        self.head, self.bw, self.l2, self.l2_half = c0.head, c0.bw, c0.l2, c0.dev.l2_mb * 2**20 / 2
        self.const = np.array([[c.const] for c in curves])
        self.b1 = np.array([[c.b1] for c in curves])
        self.b2 = np.array([[c.b2] for c in curves])
        self.nm = np.stack([-(-self.m // c.bm) for c in curves])                       # [n, len(m)]
        self.nmf = self.nm.astype(float)
        self.b1m, self.b2m = self.b1 * self.m, self.b2 * self.m
        self.groups, offset, index = {}, 0, []
        for ci, c in enumerate(curves):
            g = self.groups.setdefault((c.p.block_n, c.p.block_k, c.p.split_k),
                                       _Layout(c.p, c.L, template.tile[0] // c.p.block_n))
            u, inv = np.unique(self.nm[ci], return_inverse=True)
            g.add(c, offset, u)
            index.append(offset + inv.reshape(-1))
            offset += len(u)
        self.size, self.index = offset, np.stack(index)
        for g in self.groups.values():
            g.finish()

    def evaluate(self, model: "CostModel") -> np.ndarray:
        """[len(params), len(m)] predicted µs for ``model``'s tile map."""
        if not self.n:
            return np.empty((0, len(self.m)))
        crit = np.empty(self.size)
        w_bytes = None
        for g in self.groups.values():
            s, d, w_bytes = model.row_steps(g.p)
            g.evaluate(s, d, crit)
        x = self.nmf * w_bytes                       # = nm * w_bytes
        if w_bytes > self.l2_half:                  # W re-read from DRAM per M-block: 1 + (nm - 1) * 1.0 = nm
            a1 = self.head + x / self.bw
        else:                                       # 1 + (nm - 1) * 0.0 = 1.0
            a1 = self.head + w_bytes * 1.0 / self.bw
        return self.const + np.maximum(np.maximum(a1 + self.b1m, x / self.l2 + self.b2m), crit[self.index])


class _Layout:
    """The configs of a ``HybridBatch`` sharing one program layout (BLOCK_N, BLOCK_K, split-K): one
    times row per (config, programs per SM) it needs, and the cyclic-window maxima ``Curve._crit``
    reads, precomputed as index arrays (none of it reads the tile map).  The ``rep`` = tn / BLOCK_N
    consecutive programs of a tile-row are alike, so rows hold one time per (K slice, tile-row)
    and a window of programs is the window of tile-rows it touches (the same maximum)."""

    def __init__(self, p, L, rep):
        self.p, self.L, self.rep = p, L, rep
        self.rows, self.coeffs = {}, []           # (curve, k) -> times row; row -> Curve.coeffs(k)
        self.low = []                             # (crit slots, row): one wave, crit = tmax[row]
        self.high = []                            # per curve with full waves: slots, row, f, a, ln, q, C
        self.n_curves = 0

    def _row(self, c, k):
        key = (self.n_curves, k)
        if key not in self.rows:
            self.rows[key] = len(self.coeffs)
            self.coeffs.append(c.coeffs(k))
        return self.rows[key]

    def add(self, c, offset, u):
        """Curve ``c`` at the M-block counts ``u``, whose crit values go to slots offset + i."""
        P = u * c.L
        share = np.minimum(c.occ, -(-np.minimum(P, c.C) // c.sms))
        low = share < c.occ
        for k in np.unique(share[low]):
            sel = np.flatnonzero(share == k)
            self.low.append((offset + sel, np.full(len(sel), self._row(c, int(k)))))
        sel = np.flatnonzero(~low)
        if len(sel):
            f = -(-P[sel] // c.C) - 1                                        # waves before the last
            r = P[sel] - f * c.C
            q = c.L // math.gcd(c.L, c.C) if c.C < c.L else 0
            self.high.append(dict(slots=offset + sel, row=self._row(c, c.occ), f=f, a=(f * c.C) % c.L,
                                  ln=np.minimum(r, c.L), q=q, C=c.C))
        self.n_curves += 1

    def finish(self):
        self.co = np.array(self.coeffs)                                      # [R, 5]
        R, L, rep = len(self.coeffs), self.L, self.rep
        Lc = L // rep
        cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int64)  # noqa: E731
        self.low_slots, self.low_rows = cat([s for s, _ in self.low]), cat([r for _, r in self.low])
        # results live in mx = [tmax of every row, then the window queries]; a window of all L
        # programs is its row's tmax.  Queries: each curve's last (partial) wave, then the first
        # ``nw`` of its q full-wave windows (offsets j C mod L) when a wave is shorter than L --
        # all q only when some M-block count spans a whole period of them.
        qrow, qa, qln = [], [], []

        def query(row, a, ln):
            full = ln == L
            idx = np.where(full, row, 0)
            n = int((~full).sum())
            idx[~full] = R + sum(len(x) for x in qa) + np.arange(n)
            a, ln = a[~full], ln[~full]
            qrow.append(np.full(n, row))
            qa.append(a // rep)                                       # in tile-rows (cyclic, period Lc)
            qln.append((a + ln - 1) // rep - a // rep + 1)
            return idx

        hw, hn = [], []
        for h in self.high:
            h["last"] = query(h["row"], h["a"], h["ln"])
            if h["q"]:
                h["nw"] = h["q"] if (h["f"] >= h["q"]).any() else int((h["f"] % h["q"]).max())
                h["wq"] = query(h["row"], (np.arange(h["nw"]) * h["C"]) % L, np.full(h["nw"], h["C"]))
                hw.append(h)
            else:
                hn.append(h)
        qrow, qa, qln = cat(qrow), cat(qa), cat(qln)
        self.n_q = len(qa)
        self.table = sorted(set(qrow.tolist()))
        pos = np.zeros(R, dtype=np.int64)
        pos[self.table] = np.arange(len(self.table))
        qrow = pos[qrow]
        top = int(np.floor(np.log2(qln.max()))) if self.n_q else 0
        self.direct = int(qln.sum()) <= len(self.table) * 2 * Lc * (top + 1)
        if self.direct:        # gather every window's times and reduce: cheaper than a sparse table
            starts = np.concatenate([[0], np.cumsum(qln)[:-1]]) if self.n_q else np.zeros(0, np.int64)
            step = np.arange(int(qln.sum())) - np.repeat(starts, qln)
            self.gather = qrow.repeat(qln) * Lc + (qa.repeat(qln) + step) % Lc
            self.starts = starts
        else:                  # sparse table of range maxima on the doubled rows
            j = np.floor(np.log2(qln)).astype(np.int64)
            self.top = top
            self.queries = [(int(jj), qrow[j == jj], qa[j == jj], qa[j == jj] + qln[j == jj] - 2 ** int(jj),
                             np.flatnonzero(j == jj)) for jj in np.unique(j)]
        # full waves: win[i] = sum of the first i wave maxima (a zero-padded [curves, nw] cumsum)
        self.n_wins, self.wmax = len(hw), max((h["nw"] for h in hw), default=0)
        w = self.wmax + 1
        self.win_flat = cat([i * self.wmax + np.arange(h["nw"]) for i, h in enumerate(hw)])
        self.win_src = cat([h["wq"] for h in hw])
        self.w_slots, self.w_last = cat([h["slots"] for h in hw]), cat([h["last"] for h in hw])
        self.w_fq = cat([h["f"] // h["q"] for h in hw])
        # win[q] is read only where f >= q (else it is multiplied by 0: win[0] = 0.0 gives the same)
        self.w_qidx = cat([i * w + np.where(h["f"] >= h["q"], h["q"], 0) for i, h in enumerate(hw)])
        self.w_fidx = cat([i * w + h["f"] % h["q"] for i, h in enumerate(hw)])
        self.n_slots, self.n_last = cat([h["slots"] for h in hn]), cat([h["last"] for h in hn])
        self.n_f, self.n_rows = cat([h["f"] for h in hn]), cat([np.full(len(h["f"]), h["row"]) for h in hn])

    def evaluate(self, s, d, crit):
        """Write this layout's crit values into ``crit``; ``s`` / ``d``: 2:4 / dense steps per
        (K slice, tile-row), from ``CostModel.row_steps``."""
        co = self.co
        t = co[:, :1] + np.maximum(s * co[:, 1:2] + d * co[:, 2:3], s * co[:, 3:4] + d * co[:, 4:5])
        mx = np.empty(len(co) + self.n_q)
        mx[:len(co)] = t.max(1)
        if self.n_q and self.direct:
            mx[len(co):] = np.maximum.reduceat(t[self.table].reshape(-1)[self.gather], self.starts)
        elif self.n_q:
            tt = t[self.table]
            levels = [np.concatenate([tt, tt], axis=1)]
            while len(levels) <= self.top:
                h = 2 ** (len(levels) - 1)
                levels.append(np.maximum(levels[-1][:, :-h], levels[-1][:, h:]))
            res = np.empty(self.n_q)
            for jj, rows, a, b, out in self.queries:
                res[out] = np.maximum(levels[jj][rows, a], levels[jj][rows, b])
            mx[len(co):] = res
        crit[self.low_slots] = mx[self.low_rows]
        if self.n_wins:
            waves = np.zeros(self.n_wins * self.wmax)
            waves[self.win_flat] = mx[self.win_src]
            win = np.concatenate([np.zeros((self.n_wins, 1)), np.cumsum(waves.reshape(self.n_wins, self.wmax), axis=1)],
                                 axis=1).reshape(-1)
            crit[self.w_slots] = self.w_fq * win[self.w_qidx] + win[self.w_fidx] + mx[self.w_last]
        if len(self.n_slots):
            crit[self.n_slots] = self.n_f * mx[self.n_rows] + mx[self.n_last]


def _linear(c: Curve, lo: int, hi: int):
    """Exact (sympy) intercept and slope of a curve on [lo, hi], where it is linear."""
    import sympy
    a1, b1, a2, b2, cc = (float(v[0]) for v in c.pieces([lo]))     # same M-block count on [lo, hi]
    mid = (lo + hi) / 2                                           # no kink strictly inside: the max
    a, b = max([(a1, b1), (a2, b2), (cc, 0.0)], key=lambda ab: ab[0] + ab[1] * mid)   # term at mid holds
    return sympy.Rational(c.const) + sympy.Rational(a), sympy.Rational(b)


def _breakpoints(c: Curve, m_max: int) -> np.ndarray:
    """The M in 1..m_max between which ``c`` is linear: multiples of BLOCK_M (and the next M)
    and the integers around every kink of the max (sorted, unique)."""
    mult = np.arange(c.bm, m_max + c.bm, c.bm)
    pts = [np.minimum(np.concatenate([mult, mult + 1]), m_max)]
    lo = mult - c.bm + 1
    a1, b1, a2, b2, cc = c.pieces(lo)
    with np.errstate(divide="ignore", invalid="ignore"):
        xs = [(a2 - a1) / (b1 - b2), (cc - a1) / b1, (cc - a2) / b2]
    for x in xs:
        ok = np.isfinite(x) & (x >= lo) & (x <= mult)
        f = np.floor(x[ok]).astype(np.int64)
        pts.append(np.clip(np.concatenate([f, f + 1]), 1, m_max))
    return np.unique(np.concatenate(pts))


TABLE_MAX = 1 << 17      # up to this m_max, curves are evaluated on every M (1 MiB a curve)


def lower_envelope(curves: list, m_max: int, shared: int = 0) -> list[tuple[int, int, int]]:
    """Ranges ``(m_lo, m_hi, i)`` covering 1..m_max where curve ``i`` is the cheapest (ties: lowest i).

    Every curve is linear between consecutive evaluation points (multiples of each BLOCK_M and
    the integers around every kink of a max), so the argmin only changes where it differs at two
    consecutive points; there the crossing of the two linear pieces is solved exactly (sympy).
    The first ``shared`` curves are reused across calls (the dense baseline of a shape): their
    breakpoints and values on 1..m_max are memoised on them.
    """
    import sympy
    pts, rows = [np.array([1, m_max], dtype=np.int64)], []
    for i, c in enumerate(curves):
        if i < shared:
            memo = c.__dict__.setdefault("_envelope_memo", {})
            if m_max not in memo:
                memo[m_max] = (_breakpoints(c, m_max),
                               c(np.arange(1, m_max + 1)) if m_max <= TABLE_MAX else None)
            pts.append(memo[m_max][0])
            rows.append(memo[m_max][1])
        else:
            pts.append(_breakpoints(c, m_max))
            rows.append(None)
    P = np.unique(np.concatenate(pts))
    V = np.stack([c(P) if r is None else r[P - 1] for c, r in zip(curves, rows)])
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

    for q in np.flatnonzero(best[1:] != best[:-1]) + 1:     # the argmin differs at two consecutive points
        i, j = int(best[q - 1]), int(best[q])
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
