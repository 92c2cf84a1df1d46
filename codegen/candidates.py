"""The kernel configurations the planner chooses among, one home.

A ``Candidate`` is what varies with M (the packed format fixes only the tile and the tile-row
order): the strategy and its blocks.  The lists are short on purpose -- every entry is compiled
once per (dtype, tile, target, Triton version) for its SASS counts (``counts``), shipped for the
common cases -- and cover: decode (gemv, 1-4 rows of X per program, narrow programs so M = 1
fills every SM with 4-8 warps each), small batches (mma with 16-64 rows) and prefill (mma
128x128; dense usually wins there).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from .spec import KernelSpec


@dataclass(frozen=True)
class Candidate:
    """The M-dependent part of a kernel spec."""

    strategy: str
    block_m: int
    block_n: int
    block_t: int
    num_warps: int
    num_stages: int
    split_k: int = 1
    block_k: int = 0          # 0: the tile width (up to 128)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Candidate":
        return cls(**{k: (str(v) if k == "strategy" else int(v)) for k, v in d.items() if k in cls.__dataclass_fields__})

    def spec(self, n: int, k: int, dtype, tile, **kw) -> KernelSpec:
        """The full kernel spec of this candidate for a weight."""
        return KernelSpec(n=n, k=k, dtype=dtype, tile=tuple(tile), strategy=self.strategy, block_m=self.block_m,
                          block_n=self.block_n, block_t=self.block_t, num_warps=self.num_warps,
                          num_stages=self.num_stages, split_k=self.split_k, block_k=self.block_k,
                          **kw)

    def label(self) -> str:
        s = f"{self.strategy} bm{self.block_m} bn{self.block_n}"
        return s + (f" bt{self.block_t}" if self.block_t > 1 else "") + (f" sk{self.split_k}" if self.split_k > 1 else "")


# gemv: (BLOCK_N, BLOCK_T, warps) keep 8-16 groups of 4 per thread per step
GEMV = ([Candidate("gemv", 1, bn, bt, w, 4) for bn, bt, w in ((8, 4, 2), (16, 4, 4), (32, 2, 4))]
        + [Candidate("gemv", bm, 16, 4, 4, 4) for bm in (2, 4)])
# mma: larger blocks take narrower K steps (registers: 32x32x128 with 2 tiles a step needs 255 on sm_90, 32x64x128
# spills; at 64 columns a step both fit)
MMA = [Candidate("mma", bm, bn, bt, w, 3, block_k=bk) for bm, bn, bt, w, bk in (
    (16, 16, 4, 4, 0), (16, 32, 2, 4, 0), (16, 64, 1, 4, 0), (32, 32, 2, 4, 64), (32, 64, 1, 4, 64),
    (64, 64, 1, 4, 64), (128, 64, 1, 4, 32), (128, 128, 1, 8, 32))]
SPLITS = (1, 2, 4)            # split-K variants share the loop counts of their split-K 1 kernel
SPLIT_BLOCKS = {(32, 64), (64, 64), (128, 64)}   # (BLOCK_M, BLOCK_N) of the mma kernels planned with split-K


def base(dtype) -> list[Candidate]:
    """The candidates compiled for SASS counts (split-K 1)."""
    return GEMV + MMA


def all_specs(dtype, tile) -> list[KernelSpec]:
    """Representative specs of ``base`` for a dtype and tile (what the shipped table holds)."""
    out = []
    for c in base(dtype):
        try:
            out.append(c.spec(2 * tile[0], 4 * tile[1], dtype, tile))
        except ValueError:
            continue
    return out


def with_split(c: Candidate, s: int) -> Candidate:
    return replace(c, split_k=s)
