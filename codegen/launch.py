"""Launching generated kernels: the default block sizes, ``make_spec`` and ``launch``.

``launch`` handles N-D and non-contiguous ``x`` (reshaped to 2-D, strides passed as they are),
output dtype = ``x.dtype``, M = 0, and the fp32 workspace of split-K.  The per-site dispatch by M
lives in ``runner.HybridRunner``.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .kernels import GeneratedKernel
from .spec import KernelSpec, dtype_name

# Upper M of each dispatch bucket (None: no bound).  BLOCK_M 16 / 64 / 128 in them.
M_BUCKETS = (16, 128, None)
# split-K aims at >= 4 programs per SM of an H200 (132 SMs) for the memory-bound small-M shapes:
# 4096x4096 with BLOCK_N 64 has only 64 output blocks, so one wave would leave half the SMs idle.
TARGET_PROGRAMS = 4 * 132
INTERPRET_MSG = ("patchc: kernel='triton' on a CPU tensor runs the Triton interpreter, which needs "
                 "TRITON_INTERPRET=1 in the environment before triton/torch are imported; set it "
                 "(e.g. `TRITON_INTERPRET=1 python ...`) or use kernel='reference'")


def _pow2_divisor(x: int, cap: int) -> int:
    """Largest power of two dividing ``x`` and <= ``cap``."""
    return min(x & -x, cap)


# ======== DEFAULT BLOCK SIZES: placeholder until the cost model's plan_dispatch replaces it ========
def default_blocks(m: int, n: int, k: int, tile, dtype, interpret: bool = False,
                   block_n: Optional[int] = None, block_k: Optional[int] = None) -> dict:
    """Block sizes / split-K / warps / stages for ``m`` rows (the upper end of an M bucket).

    BLOCK_N = min(tn, 64), BLOCK_K = min(tk, 64) (64x64 16-bit operands = 8 KiB per stage);
    BLOCK_M 16 for M <= 16 (decode), 64 up to 128, else 128; split-K at M <= 128.  The interpreter gets large blocks
    (its cost is per program and per loop step, not per element).  ``block_n`` / ``block_k``:
    fixed by the weight's packing (the cost model), the rest is derived from them.
    """
    tn, tk = tile
    if interpret:
        bm = 16
        while bm < min(m, 64):
            bm *= 2
        return dict(block_m=bm, block_n=block_n or _pow2_divisor(tn, 128), block_k=block_k or _pow2_divisor(tk, 128),
                    split_k=1, num_warps=4, num_stages=1)
    fp32 = dtype_name(dtype) == "fp32"
    bm = 16 if m <= 16 else 64 if m <= 128 else 128
    # fp32 ("ieee": FMA dots) holds more in registers: 16x32x64 spills 40 B on sm_90, 16x64x32 and
    # 64x32x32 fit (224 / 255 registers); 16-bit: 64x64 weight blocks
    bn = block_n or _pow2_divisor(tn, 32 if fp32 and bm >= 64 else 64)
    bk = block_k or _pow2_divisor(tk, 32 if fp32 else 64)
    # BLOCK_M 128 only with 64x64 weight blocks: 128x64x128 spills 40 B on sm_80 even at 8 warps
    if bm == 128 and bn * bk > 64 * 64:
        bm = 64
    split = 1
    if m <= 128:
        programs = -(-n // tn) * (tn // bn) * -(-m // bm)
        n_k = -(-k // tk)
        while split * 2 <= min(8, n_k) and programs * split * 2 <= TARGET_PROGRAMS:
            split *= 2
    # the 2:4 expansion keeps ~4 [BN, BK] tensors live: 16x128x128 needs 255 registers at 4 warps
    # and 125 at 8 (sm_90); 64x128x128 at 4 warps spills 380 B
    warps = 8 if bm >= 128 or bn * bk >= 128 * 128 else 4
    # shared memory per stage ~ X block + the two gathered value blocks: (BM + 2 BN) BK; keep the
    # total near 100 KiB (measured: 16x128x128 bf16 is 100 KiB at 2 stages, 168 KiB at 3)
    per_stage = (bm + 2 * bn) * bk * (4 if fp32 else 2)
    return dict(block_m=bm, block_n=bn, block_k=bk, split_k=split,
                num_warps=warps, num_stages=max(2, min(4, (100 * 1024) // per_stage)))
# ====================================================================================================


def make_spec(n: int, k: int, dtype, tile, m: int, *, bias: bool, interpret: bool,
              input_precision: Optional[str] = None, plan=None) -> KernelSpec:
    """The spec for an M bucket; ``plan`` (dict from a cost model) overrides the defaults."""
    blocks = default_blocks(m, n, k, tile, dtype, interpret)
    if plan:
        blocks.update({f: plan[f] for f in blocks if plan.get(f) is not None})
    if input_precision is None:
        input_precision = "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return KernelSpec(n=n, k=k, dtype=dtype_name(dtype), tile=tuple(tile), bias=bias, interpret=interpret,
                      input_precision=input_precision, **blocks)


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def launch(gk: GeneratedKernel, x: torch.Tensor, packed, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Run ``gk`` on ``x`` [..., K] with ``packed``; returns [..., N] in ``x.dtype``."""
    s = gk.spec
    if x.device.type != "cuda":
        if not interpreter_active() or type(gk.fn).__name__ != "InterpretedFunction":
            raise RuntimeError(INTERPRET_MSG)
    x2 = x.reshape(-1, x.shape[-1])                       # a view when possible; strides passed as-is
    m = x2.shape[0]
    split = s.split_k > 1
    y = (torch.zeros if split else torch.empty)((m, s.n), device=x.device,
                                                dtype=torch.float32 if split else x.dtype)
    if m:
        tn = s.tile[0]
        grid = (-(-s.n // tn) * (tn // s.block_n), -(-m // s.block_m), s.split_k)
        args = [x2, y] + ([bias.to(x.dtype).contiguous()] if s.bias else [])
        args += [packed.row_order, packed.sparse_off, packed.dense_off, packed.sparse_kidx, packed.dense_kidx,
                 packed.sparse_vals, packed.sparse_meta, packed.dense_vals]
        gk.fn[grid](*args, m, x2.stride(0), x2.stride(1), y.stride(0),
                    num_warps=s.num_warps, num_stages=s.num_stages)
    if split and x.dtype != torch.float32:
        y = y.to(x.dtype)
    return y.reshape(*x.shape[:-1], s.n)
