"""Cost model of one linear ``Y[M, N] = X[M, K] . W^T``: a generated kernel, read from its SASS,
against a cuBLAS-like dense kernel, both on one device of ``devices``.

A generated kernel's programs (tile-row x BLOCK_N sub-block x M block x K slice) each run
ceil(slots / BLOCK_T) iterations of the 2:4 loop and of the dense loop; ``counts`` gives each
iteration's warp-instructions per pipe (from the compiled kernel's SASS), the rest of a program's
instructions, its registers, shared memory and pipeline depth.  Programs go to SMs in launch
order, round robin; per SM the time is the largest of

* its bytes through the L1 fill path (``sm_bytes_per_clk``);
* its instructions on each pipe at the pipe's rate (``devices.PIPE_SOURCES``); the issue rate
  shrinks when an SM holds fewer than 2 warps per sub-partition (``warp_ipc``);
* latency: each resident program keeps ``depth`` steps in flight (the pipeliner's buffers), so
  an SM's steps take ``steps x latency / (depth x resident programs)``;

and the kernel takes ``launch + 2 latencies (its record, then its first tiles) + max(DRAM time,
slowest SM)``.  DRAM moves the packed weight once (again per M block when it does not fit half the
L2), X and Y.  The dense kernel takes ``launch + 1 latency + max(bytes / bandwidth, FLOPs /
tensor-core rate)``.  So a prediction never beats the bandwidth bound: hybrid time is at least
its bytes over the same bandwidth, plus one more latency.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from patchc.dtypes import ELT_BYTES
from patchc.types import grid_of

from .candidates import Candidate
from .counts import LoopCounts
from .devices import DeviceSpec, dtype_key

PIPES = ("int", "fp", "lsu", "tensor")


class Weight:
    """What the model reads of a tile map: per packed tile-row its 2:4 and dense tile counts,
    rows, and which kind its ragged tile-column (if any) is.  ``tile_kind`` uint8 [nN, nK]."""

    def __init__(self, tile_kind, shape, tile, dtype, row_order=None):
        kind = np.asarray(torch.as_tensor(tile_kind).to(torch.uint8).cpu().numpy(), dtype=np.int64)
        self.shape, self.tile = tuple(int(s) for s in shape), tuple(int(t) for t in tile)
        self.dtype = dtype_key(dtype)
        self.elt = ELT_BYTES[self.dtype]
        (n, k), (tn, tk) = self.shape, self.tile
        nN, nK = grid_of(self.shape, self.tile)
        order = np.arange(nN) if row_order is None else np.asarray(torch.as_tensor(row_order).cpu(), np.int64)
        kp = kind[order]
        self.n_s, self.n_d = kp.sum(1), nK - kp.sum(1)
        self.rows = np.minimum(tn, n - order * tn)
        self.wr = k - (nK - 1) * tk                                      # width of the last tile-column
        self.edge_s = (kp[:, -1] == 1) & (self.wr != tk)
        self.edge_d = (kp[:, -1] == 0) & (self.wr != tk)
        self.frac = float(kind.mean()) if kind.size else 0.0
        # bytes per weight row of a full 2:4 / dense tile, of the ragged one
        self.b_s, self.b_d = tk // 2 * self.elt + tk / 8, tk * self.elt
        self.b_sr, self.b_dr = self.wr // 2 * self.elt + self.wr / 8, self.wr * self.elt
        self.w_bytes = float((self.rows * ((self.n_s - self.edge_s) * self.b_s + self.edge_s * self.b_sr
                                           + (self.n_d - self.edge_d) * self.b_d + self.edge_d * self.b_dr)).sum())
        self.dense_bytes = float(n * k * self.elt)

    def bound(self) -> float:
        """Largest possible speedup over dense at small M: dense bytes over packed bytes."""
        return self.dense_bytes / self.w_bytes if self.w_bytes else 1.0


@dataclass(frozen=True)
class Prediction:
    """Predicted µs of one kernel at one M, and its terms (for explain and the roofline)."""

    us: float
    terms: dict

    def to_dict(self) -> dict:
        return {"us": self.us, **self.terms}


def occupancy(dev: DeviceSpec, lc: LoopCounts, warps: int) -> int:
    """Programs resident per SM (0: the kernel does not fit, or spills)."""
    if lc.spills or lc.shared_bytes > dev.smem_per_block_kb * 1024:
        return 0
    by_smem = int(dev.smem_per_sm_kb * 1024 // (lc.shared_bytes + 1024))
    regs = 8 * math.ceil(max(lc.registers, 1) / 8)
    by_regs = dev.regs_per_sm // (regs * 32 * warps)
    return max(0, min(by_smem, by_regs, dev.max_warps_per_sm // warps, 32))


class Programs:
    """Per-program work of a candidate on a weight, for one M block (numpy arrays, launch order:
    tile-row x sub-block fastest, then K slice)."""

    def __init__(self, w: Weight, c: Candidate, bk: int):
        tn, tk = w.tile
        sub = -(-tn // c.block_n)
        r = np.repeat(np.arange(len(w.rows)), sub)
        b = np.tile(np.arange(sub), len(w.rows))
        rows = np.clip(w.rows[r] - b * c.block_n, 0, c.block_n)          # weight rows of each program
        s = np.arange(c.split_k)[:, None]
        total = (w.n_s + w.n_d)[r][None, :]
        t0, t1 = total * s // c.split_k, total * (s + 1) // c.split_k
        ns, nd = w.n_s[r][None, :], w.n_d[r][None, :]
        es, ed = w.edge_s[r][None, :], w.edge_d[r][None, :]
        s_full, d_full = ns - es, nd - ed
        cnt = lambda lo, hi: np.maximum(0, np.minimum(t1, hi) - np.maximum(t0, lo))  # noqa: E731
        a_s, a_d = cnt(0, s_full), cnt(ns, ns + d_full)                  # full slots per program
        r_s, r_d = es & (t0 <= ns - 1) & (ns - 1 < t1), ed & (t0 <= ns + d_full) & (ns + d_full < t1)
        bt = c.block_t
        ksteps = -(-tk // bk) if c.strategy == "mma" else 1
        self.it_s = (-(-a_s // bt) * ksteps + r_s).ravel().astype(float)     # loop iterations
        self.it_d = (-(-a_d // bt) * ksteps + r_d).ravel().astype(float)
        self.slots = (a_s + a_d + r_s + r_d).ravel().astype(float)
        rows_all = np.tile(rows, c.split_k)
        self.w_bytes = rows_all * ((a_s * w.b_s + r_s * w.b_sr + a_d * w.b_d + r_d * w.b_dr).ravel())
        self.x_cols = ((a_s + a_d) * tk + (r_s + r_d) * w.wr).ravel().astype(float)   # K columns of X read
        self.n = len(self.it_s)


def _per_sm(work: np.ndarray, n_blocks: int, sms: int):
    """Sums of the work [L, R] of ``n_blocks`` repetitions of the L programs dealt round robin:
    [SMs, R] exactly up to 8 waves; beyond, (average, largest program) for ``average + program``."""
    L = len(work)
    n = L * n_blocks
    if n <= 8 * sms:
        seq = np.tile(work, (n_blocks, 1)) if n_blocks > 1 else work
        pad = -(-n // sms) * sms - n
        if pad:
            seq = np.concatenate([seq, np.zeros((pad, work.shape[1]))])
        return seq.reshape(-1, sms, work.shape[1]).sum(0)
    return (work.sum(0) * n_blocks / sms + work.max(0))[None, :]


RESOURCES = ("sm_bytes", "latency", "issue", "int", "fp", "lsu", "tensor")


class HybridModel:
    """The predicted time of one generated kernel on one weight as a function of M (vectorised)."""

    def __init__(self, w: Weight, c: Candidate, dev: DeviceSpec, lc: LoopCounts):
        self.w, self.c, self.dev, self.lc = w, c, dev, lc
        self.occ = occupancy(dev, lc, c.num_warps)
        self.feasible = self.occ > 0
        if not self.feasible:
            return
        p = self.p = Programs(w, c, c.block_k or min(w.tile[1], 128))
        warps, e = c.num_warps, w.elt
        ins = lambda loop, pipe: loop["pipes"].get(pipe, 0) if pipe else loop["instructions"]  # noqa: E731
        tensor = 2.0 * c.block_m * c.block_n * p.x_cols if c.strategy == "mma" else np.zeros(p.n)
        # per program and M block, in RESOURCES order: a constant part and a part per row of X
        self.base = np.stack([p.w_bytes, p.it_s + p.it_d,
                              warps * (p.it_s * ins(lc.s, None) + p.it_d * ins(lc.d, None) + lc.other),
                              *(warps * (p.it_s * ins(lc.s, q) + p.it_d * ins(lc.d, q)) for q in ("int", "fp", "lsu")),
                              tensor], 1)
        self.per_row = np.zeros_like(self.base)
        self.per_row[:, 0] = p.x_cols * e
        clk = dev.clock_ghz * 1e3                                       # clocks per µs
        mma_rate = dev.mma_flop_per_clk        # mma.sync as achieved (see devices.PIPE_SOURCES)
        if w.dtype == "fp32":       # "highest": FMA on the FP32 lanes; "high": TF32 at half the 16-bit rate
            mma_rate = (dev.fp_per_clk * 64 * dev.mma_eff if torch.get_float32_matmul_precision() == "highest"
                        else dev.mma_flop_per_clk / 2)
        self.rate = np.array([dev.sm_bytes_per_clk, 1.0, dev.issue_per_clk, dev.int_per_clk, dev.fp_per_clk,
                              dev.lsu_per_clk, mma_rate]) * clk
        self.lat = dev.mem_latency_ns * 1e-3
        self.fixed = dev.launch_us + 2 * self.lat + (dev.split_us if c.split_k > 1 else 0.0)

    def _rates(self, resident):
        """[len(resident), R] work per µs of one SM with ``resident`` programs on it."""
        resident = np.asarray(resident, dtype=float)
        rate = np.tile(self.rate, (len(resident), 1))
        rate[:, 1] = max(1, self.lc.depth) * resident / self.lat                      # steps per µs
        rate[:, 2] *= np.minimum(1.0, resident * self.c.num_warps / 4 * self.dev.warp_ipc)   # issue per SM
        return rate

    def _sm(self, nm: int, rows: np.ndarray):
        """[len(rows), R] µs per resource on the slowest SM with ``nm`` M blocks; resident programs.
        (Per resource, the SM with the most work at the largest row count is the slowest.)"""
        dev = self.dev
        resident = max(1, min(self.occ, -(-self.p.n * nm // dev.sm_count)))
        base, per_row = _per_sm(self.base, nm, dev.sm_count), _per_sm(self.per_row, nm, dev.sm_count)
        top = np.argmax(base + rows.max() * per_row, axis=0)                          # [R]
        a, b = base[top, np.arange(base.shape[1])], per_row[top, np.arange(base.shape[1])]
        work = a[None, :] + rows[:, None] * b[None, :]                                 # [m, R]
        return work / self._rates([resident]), resident

    def __call__(self, ms) -> np.ndarray:
        ms = np.atleast_1d(np.asarray(ms, dtype=np.int64))
        if not self.feasible:
            return np.full(len(ms), math.inf)
        sms, bm = self.dev.sm_count, self.c.block_m
        nm = -(-ms // bm)
        rows = np.minimum(ms, bm).astype(float)
        t = np.empty(len(ms))
        few = nm * self.p.n <= 8 * sms                   # exact round robin, one evaluation per M-block count
        for v in np.unique(nm[few]):
            sel = few & (nm == v)
            t[sel] = self._sm(int(v), rows[sel])[0].max(1)
        if (~few).any():                                 # many waves: the average SM plus one program
            n, r = nm[~few].astype(float), rows[~few]
            work = ((self.base.sum(0)[None, :] + r[:, None] * self.per_row.sum(0)[None, :]) * n[:, None] / sms
                    + self.base.max(0)[None, :] + r[:, None] * self.per_row.max(0)[None, :])
            t[~few] = (work / self._rates(np.full(len(n), self.occ))).max(1)
        return self.fixed + np.maximum(t, self._dram(ms))

    def _dram(self, ms) -> np.ndarray:
        w, dev = self.w, self.dev
        n, k = w.shape
        nm = -(-ms // self.c.block_m)
        reread = np.where(w.w_bytes > dev.l2_mb * 2**20 / 2, nm, 1)    # W again per M block past half the L2
        dram = w.w_bytes * reread + ms * k * w.elt + ms * n * (4 * (self.c.split_k > 1) + w.elt)
        return dram / (dev.mem_bw_gbs * 1e3 * dev.bw_eff)

    def terms(self, m: int) -> Prediction:
        """The prediction at one M with every term (µs), the bounding one and the launch shape."""
        if not self.feasible:
            return Prediction(math.inf, {"reason": "does not fit on the SM (registers / shared memory / spills)"})
        nm = -(-m // self.c.block_m)
        t, resident = self._sm(nm, np.array([float(min(m, self.c.block_m))]))
        terms = {f"{r}_us": float(v) for r, v in zip(RESOURCES, t[0])}
        terms["dram_us"] = float(self._dram(np.array([m]))[0])
        bound = max(terms, key=terms.get)
        return Prediction(self.fixed + terms[bound], {"fixed_us": self.fixed, **terms, "bound_by": bound[:-3],
                                                      "programs": self.p.n * nm, "resident": resident,
                                                      "occupancy": self.occ, "counts": self.lc.source})


def _dense_terms(shape, dtype, ms, dev: DeviceSpec):
    n, k = shape
    ms = np.asarray(ms, dtype=float)
    e = ELT_BYTES[dtype_key(dtype)]
    t_mem = (n * k + ms * k + ms * n) * e / (dev.mem_bw_gbs * 1e3 * dev.bw_eff)
    t_mma = 2.0 * ms * n * k / (dev.tflops(dtype) * 1e6 * dev.mma_eff)
    return dev.launch_us + dev.mem_latency_ns * 1e-3, t_mem, t_mma


def dense_us(shape, dtype, ms, dev: DeviceSpec) -> np.ndarray:
    """``predict_dense`` at every M of ``ms`` (vectorised)."""
    fixed, t_mem, t_mma = _dense_terms(shape, dtype, ms, dev)
    return fixed + np.maximum(t_mem, t_mma)


def predict_dense(shape, dtype, m: int, dev: DeviceSpec) -> Prediction:
    """Predicted µs of a cuBLAS-like dense kernel (memory or tensor-core bound, one latency)."""
    fixed, t_mem, t_mma = (float(np.asarray(v).ravel()[0]) for v in _dense_terms(shape, dtype, [m], dev))
    return Prediction(fixed + max(t_mem, t_mma), {"fixed_us": fixed, "dram_us": t_mem, "tensor_us": t_mma,
                                                  "bound_by": "dram" if t_mem >= t_mma else "tensor"})
