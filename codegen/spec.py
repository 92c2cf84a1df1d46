"""``KernelSpec``: everything one generated hybrid kernel is specialised on, and its cache key.

A spec is plain, frozen, JSON-serialisable metadata (no tensors, no Triton import).  Its
``key()`` hashes the spec together with the codegen sources that affect rendering and the
patchc / torch / triton versions, so a change to any of them lands in a fresh cache entry.

What is fixed per weight (when it is packed): ``n``, ``k``, ``dtype``, ``tile``, ``block_n``,
``block_k`` and the tile-row order.  What may vary with M: ``block_m``, ``split_k``,
``num_warps`` and ``num_stages``.
"""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass, fields, replace
from importlib import metadata
from pathlib import Path
from typing import Optional

from patchc.dtypes import KERNEL_DTYPES, short_name

DTYPES = KERNEL_DTYPES
ACTIVATIONS = (None,)            # room for "silu"/"gelu" epilogues later
# the codegen files whose text changes what ``render`` produces (hashed into every key)
RENDER_SOURCES = ("spec.py", "render.py")


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
    block_m: int
    block_n: int                     # divides tn
    block_k: int                     # divides tk
    split_k: int = 1                 # > 1: programs share a tile-row's tile list, fp32 atomics
    num_warps: int = 4
    num_stages: int = 2
    bias: bool = False
    activation: Optional[str] = None
    interpret: bool = False          # rendered for TRITON_INTERPRET=1 (bf16 dots upcast to fp32)
    input_precision: str = ""        # fp32 only: "ieee" ("highest") or "tf32"; "" for 16-bit
    strategy: str = "hybrid"

    def __post_init__(self):
        object.__setattr__(self, "tile", tuple(int(t) for t in self.tile))
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        if self.dtype != "fp32":
            object.__setattr__(self, "input_precision", "")
        elif self.input_precision not in ("ieee", "tf32"):
            object.__setattr__(self, "input_precision", "ieee")
        self.validate()

    def validate(self) -> "KernelSpec":
        """Raise ``UnsupportedSpec`` when Triton cannot build this kernel."""
        tn, tk = self.tile
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            # tl.arange needs powers of two; tl.dot needs every dimension >= 16
            if not _pow2(v) or v < 16:
                raise UnsupportedSpec(f"{name}={v} must be a power of two >= 16")
        if tn % self.block_n or tk % self.block_k:
            raise UnsupportedSpec(f"blocks ({self.block_n}, {self.block_k}) must divide the tile {self.tile}")
        if self.split_k < 1 or not _pow2(self.num_warps) or self.num_stages < 1:
            raise UnsupportedSpec(f"bad launch parameters split_k={self.split_k} "
                                  f"num_warps={self.num_warps} num_stages={self.num_stages}")
        if self.activation not in ACTIVATIONS:
            raise UnsupportedSpec(f"activation {self.activation!r} is not supported yet")
        return self

    # ---- derived --------------------------------------------------------------------------
    @property
    def upcast(self) -> bool:
        """bf16 dot operands are upcast to fp32 (only for the interpreter, which has no bf16 dot)."""
        return self.interpret and self.dtype == "bf16"

    @property
    def name(self) -> str:
        """Readable kernel name, e.g. ``hybrid_n4096_k4096_bf16_bm16_bn64_bk64``."""
        s = f"{self.strategy}_n{self.n}_k{self.k}_{self.dtype}_bm{self.block_m}_bn{self.block_n}_bk{self.block_k}"
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

    def with_launch(self, **kw) -> "KernelSpec":
        """A copy with other M-dependent parameters (block_m, split_k, num_warps, num_stages)."""
        return replace(self, **kw)

    def key(self) -> str:
        """Cache key: the spec, the codegen sources and the versions (16 hex digits)."""
        payload = json.dumps({"spec": self.to_dict(), "codegen": codegen_hash(), "versions": versions()},
                             sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def codegen_hash() -> str:
    """sha256 of the codegen files that affect rendering (``RENDER_SOURCES``)."""
    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for name in RENDER_SOURCES:
        h.update(name.encode())
        h.update((here / name).read_bytes())
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
