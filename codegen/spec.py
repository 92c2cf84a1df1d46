"""``KernelSpec``: everything one generated hybrid kernel is specialised on, and its cache key.

A spec is plain, frozen, JSON-serialisable metadata (no tensors, no Triton import).  Its
``key()`` hashes the spec together with the codegen sources that affect rendering and the
patchc / torch / triton versions, so a change to any of them lands in a fresh cache entry.

Two strategies share the packed format (``patchc.packing``), which fixes only the tile and the
tile-row order; everything else may change with M:

* ``gemv`` (M of a few rows): lanes run along the groups of 4 of a tile row; a 2:4 group is
  computed straight from its compressed form (pick x[i0], x[i1] with one byte permute, two FMAs),
  a dense group as two value pairs; fp32 accumulators reduced once at the end.  BLOCK_M rows of X
  per program (any power of two), BLOCK_N rows of W (any power of two), whole tile rows per step.
* ``mma`` (M from ~8 up): 2:4 tiles are expanded in registers with two byte permutes per group and
  go to ``tl.dot`` with the dense tiles; BLOCK_M, BLOCK_N >= 16, BLOCK_K divides the tile width.
"""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass, fields
from importlib import metadata
from pathlib import Path
from typing import Optional

from patchc.dtypes import KERNEL_DTYPES, short_name

DTYPES = KERNEL_DTYPES
STRATEGIES = ("gemv", "mma")
ACTIVATIONS = (None,)            # room for "silu"/"gelu" epilogues later
# the codegen files whose text changes what ``render`` produces (hashed into every key)
RENDER_SOURCES = ("spec.py", "render.py", "bodies.py", "tables.py", "args.py")


class UnsupportedSpec(ValueError):
    """The shape / tile cannot be served by the generated kernel (the reference path is used)."""


def _pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def dtype_name(dtype) -> str:
    """'fp16' | 'bf16' | 'fp32' for a torch dtype or one of those names."""
    try:
        return short_name(dtype, DTYPES)
    except ValueError:
        raise UnsupportedSpec(f"patchc kernels support fp16, bf16 and fp32, not {dtype}") from None


@dataclass(frozen=True)
class KernelSpec:
    """What one hybrid kernel is specialised on (see the module docstring)."""

    n: int
    k: int
    dtype: str                       # "fp16" | "bf16" | "fp32": X, W (and Y, bias) dtype
    tile: tuple[int, int]            # the mask tile (tn, tk) of the packed weight
    strategy: str = "mma"
    block_m: int = 16
    block_n: int = 64
    block_k: int = 0                 # 0: the tile width (gemv always takes whole tile rows)
    block_t: int = 1                 # tiles (slots of a tile-row) per loop step
    split_k: int = 1                 # > 1: programs share a tile-row's tile list, fp32 atomics
    num_warps: int = 4
    num_stages: int = 3
    bias: bool = False
    activation: Optional[str] = None
    interpret: bool = False          # rendered for TRITON_INTERPRET=1 (no inline asm, no bf16 dot)
    input_precision: str = ""        # fp32 only: "ieee" ("highest") or "tf32"; "" for 16-bit

    def __post_init__(self):
        object.__setattr__(self, "tile", tuple(int(t) for t in self.tile))
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        if self.dtype != "fp32" or self.strategy == "gemv":
            object.__setattr__(self, "input_precision", "")
        elif self.input_precision not in ("ieee", "tf32"):
            object.__setattr__(self, "input_precision", "ieee")
        if not self.block_k:
            object.__setattr__(self, "block_k", self.tile[1] if self.strategy == "gemv" or self.tile[1] <= 128
                               else 128)
        self.validate()

    def validate(self) -> "KernelSpec":
        """Raise ``UnsupportedSpec`` when Triton cannot build this kernel."""
        tn, tk = self.tile
        if self.strategy not in STRATEGIES:
            raise UnsupportedSpec(f"strategy {self.strategy!r} is not one of {STRATEGIES}")
        if self.activation not in ACTIVATIONS:
            raise UnsupportedSpec(f"activation {self.activation!r} is not supported yet")
        if self.split_k < 1 or not _pow2(self.num_warps) or self.num_stages < 1:
            raise UnsupportedSpec(f"bad launch parameters split_k={self.split_k} "
                                  f"num_warps={self.num_warps} num_stages={self.num_stages}")
        low = 1 if self.strategy == "gemv" else 16        # tl.dot needs every dimension >= 16
        for name in ("block_m", "block_n"):
            v = getattr(self, name)
            if not _pow2(v) or v < low:
                raise UnsupportedSpec(f"{name}={v} must be a power of two >= {low} for the {self.strategy} kernel")
        if not _pow2(self.block_t):
            raise UnsupportedSpec(f"block_t={self.block_t} must be a power of two")
        bk = self.block_k
        if tk % bk or not _pow2(bk) or bk < 4:
            raise UnsupportedSpec(f"block_k={bk} must be a power of two dividing the tile width {tk}")
        if self.strategy == "gemv":
            if bk != tk:
                raise UnsupportedSpec(f"the gemv kernel takes whole tile rows: block_k must be the tile width {tk}")
            if self.dtype != "fp32" and self.k % 2:
                raise UnsupportedSpec(f"the 16-bit gemv kernel reads X as value pairs: K={self.k} must be even")
        elif bk < 16 or (bk < 32 and bk != tk):
            raise UnsupportedSpec(f"block_k={bk}: the mma kernel needs block_k >= 32 (whole metadata words) "
                                  f"or the whole tile width >= 16")
        return self

    # ---- derived --------------------------------------------------------------------------
    @property
    def upcast(self) -> bool:
        """bf16 dot operands are upcast to fp32 (only for the interpreter, which has no bf16 dot)."""
        return self.interpret and self.dtype == "bf16" and self.strategy == "mma"

    @property
    def name(self) -> str:
        """Readable kernel name, e.g. ``gemv_n4096_k4096_bf16_bm1_bn16_bk128_w2s6``."""
        s = (f"{self.strategy}_n{self.n}_k{self.k}_{self.dtype}_bm{self.block_m}_bn{self.block_n}_bk{self.block_k}"
             f"_bt{self.block_t}_w{self.num_warps}s{self.num_stages}")
        if self.split_k > 1:
            s += f"_sk{self.split_k}"
        if self.bias:
            s += "_bias"
        if self.activation:
            s += f"_{self.activation}"
        if self.input_precision == "tf32":
            s += "_tf32"
        if self.interpret:
            s += "_interp"
        return s

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tile"] = list(self.tile)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "KernelSpec":
        names = {f.name for f in fields(cls)}
        return cls(**{k: (tuple(v) if k == "tile" else v) for k, v in d.items() if k in names})

    def key(self) -> str:
        """Cache key: the spec, the codegen sources and the versions (16 hex digits)."""
        payload = json.dumps({"spec": self.to_dict(), "codegen": codegen_hash(), "versions": versions()},
                             sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def codegen_hash() -> str:
    """sha256 of the codegen files that affect rendering (``RENDER_SOURCES``) and the packed format's."""
    h = hashlib.sha256()
    import importlib.util
    here = Path(__file__).resolve().parent
    fmt = [Path(importlib.util.find_spec(f"patchc.{m}").origin) for m in ("packing", "packformat", "packlayout")]
    for path in [here / name for name in RENDER_SOURCES] + fmt:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "none"


@functools.lru_cache(maxsize=None)
def versions() -> dict:
    """patchc / torch / triton versions (read from package metadata: no torch or triton import)."""
    from patchc import __version__
    return {"patchc": __version__, "torch": _version("torch"), "triton": _version("triton")}
