"""Core data types: ``TileMask`` (one weight's tile decision).

A weight W of shape (N, K) = (out, in) is cut into tiles of ``tile = (tn, tk)``.
``tile_kind[i, j]`` is 0 for a dense tile (every weight kept) and 1 for a 2:4 tile (exactly
2 of every 4 consecutive weights along K kept).  Edge tiles may be ragged; a tile whose width
is not a multiple of 4 can only be dense.
"""
from __future__ import annotations

import hashlib
import math
from typing import Optional

import torch

from .tiles import (DENSE, SPARSE24, check_mask, check_tile, expand_tiles, grid_of,  # noqa: F401 (re-exported)
                    nibble_popcounts, pack_bits, sparse_allowed, tile_sizes, unpack_bits)

_check_tile = check_tile          # the name older callers import


class TileMask:
    """One weight's decision. ``mask`` is bool [N, K] in (out, in) orientation.

    Built from a bool mask, or lazily from its packed bits (``bits=``, ``shape=``: what a mask
    file stores, ``pack_bits`` order): then ``mask`` is unpacked on first use, and what a
    compile needs before packing -- shape, fingerprint, pruned count, validity, concatenation of
    sibling masks -- comes from the bits (a 0.7 B-model plan: ~1.5 s of unpacking to bool saved
    at load; the packer unpacks each mask when it packs its weight).

    A TileMask is valid from birth: the constructor runs :func:`patchc.tiles.check_mask` and
    raises ``ValueError`` naming ``name`` (the layer, when the caller knows it), the tile and the
    group at fault.  ``validate=False`` defers the check to :meth:`validate`, for callers that
    assemble a mask from parts already checked (sibling masks concatenated by the compiler).
    Treat it as immutable: an in-place edit of ``mask`` or ``bits`` is noticed (the tensors'
    version counters) and re-checked by the next :meth:`validate`."""

    def __init__(self, tile, tile_kind: torch.Tensor, mask: Optional[torch.Tensor] = None, *,
                 bits: Optional[torch.Tensor] = None, shape=None, name: Optional[str] = None,
                 validate: bool = True):
        self.tile = check_tile(tile, name=name)
        where = f"{name}: " if name else ""
        self._cache: dict = {}
        if mask is not None:
            if mask.dim() != 2:
                raise ValueError(f"{where}mask must be 2-D (out, in), got shape {tuple(mask.shape)}")
            self._mask = mask.detach().to("cpu", torch.bool).contiguous()
            self._bits = None
            self._shape = tuple(int(x) for x in self._mask.shape)
        else:
            if bits is None or shape is None:
                raise ValueError(f"{where}TileMask needs a bool mask, or its packed bits and shape")
            self._shape = tuple(int(x) for x in shape)
            if len(self._shape) != 2:
                raise ValueError(f"{where}mask must be 2-D (out, in), got shape {self._shape}")
            bits = bits.detach().to("cpu", torch.uint8).reshape(-1).contiguous()
            if bits.numel() * 8 < math.prod(self._shape):
                raise ValueError(f"{where}{bits.numel()} packed bytes cannot hold a {self._shape} mask")
            self._mask, self._bits = None, bits
        self._seen = {"mask": _version(self._mask), "bits": _version(self._bits)}
        self.tile_kind = tile_kind.detach().to("cpu", torch.uint8).contiguous()
        want = grid_of(self.shape, self.tile)
        if tuple(self.tile_kind.shape) != want:
            raise ValueError(
                f"{where}tile_kind has shape {tuple(self.tile_kind.shape)} but a {self.shape} weight with "
                f"tile {self.tile} has a {want[0]}x{want[1]} tile grid")
        if validate:
            self.validate(name)

    def __repr__(self) -> str:
        return (f"TileMask(tile={self.tile}, shape={self.shape}, 2:4 tiles={self.num_sparse_tiles()}/"
                f"{self.tile_kind.numel()})")

    @property
    def mask(self) -> torch.Tensor:
        """bool [N, K]; unpacked from the bits on first use when built from them."""
        self._fresh()
        m = self._mask
        if m is None:
            m = self._mask = unpack_bits(self._bits, self._shape)
            self._seen["mask"] = _version(m)
        return m

    def unpacked(self) -> torch.Tensor:
        """bool [N, K] for a one-off use, not kept: the held mask when there is one, else a fresh
        unpack of the bits (``mask`` would keep 1 byte per weight for the mask's lifetime)."""
        self._fresh()
        return self._mask if self._mask is not None else unpack_bits(self._bits, self._shape)

    @property
    def bits(self) -> torch.Tensor:
        """The mask packed 8 per byte (``pack_bits`` order), kept once computed."""
        self._fresh()
        b = self._bits
        if b is None:
            b = self._bits = pack_bits(self._mask)
            self._seen["bits"] = _version(b)
        return b

    def held_nbytes(self) -> int:
        """Bytes this mask holds now: the bool mask once unpacked, plus its bits when kept."""
        return (0 if self._mask is None else self._mask.numel()) + (0 if self._bits is None else self._bits.numel())

    def _fresh(self) -> None:
        """Forget what was derived from a tensor that was edited in place since (the edited one is
        the truth: the other form and the cached statistics and validity are dropped)."""
        for key in ("mask", "bits"):
            t = getattr(self, "_" + key)
            if t is not None and _version(t) != self._seen[key]:
                other = "bits" if key == "mask" else "mask"
                setattr(self, "_" + other, None)
                self._seen = {key: _version(t), other: None}
                self._cache.clear()
                return

    # ---- shape ---------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return self._shape  # type: ignore[return-value]

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.tile_kind.shape)  # type: ignore[return-value]

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def from_kinds(cls, tile, tile_kind: torch.Tensor, mask24: torch.Tensor, name: Optional[str] = None) -> "TileMask":
        """Combine a tile map with a 2:4 mask (used inside sparse tiles): M = M_tile + (1-M_tile)·M_2:4."""
        tile = check_tile(tile, name=name)
        kind = tile_kind.to(torch.uint8).cpu()
        per_elem = expand_tiles(kind, tile, tuple(mask24.shape)).bool()
        return cls(tile, kind, torch.where(per_elem, mask24.cpu().bool(), torch.ones_like(per_elem)), name=name)

    @classmethod
    def dense(cls, shape, tile) -> "TileMask":
        tile = check_tile(tile)
        return cls(tile, torch.zeros(grid_of(shape, tile), dtype=torch.uint8),
                   torch.ones(tuple(shape), dtype=torch.bool))

    # ---- statistics ----------------------------------------------------------------------
    def pruned(self) -> int:
        """Number of pruned weights (cached, counted on the packed bits)."""
        self._stats()
        return self._cache["pruned"]

    def sparsity(self) -> float:
        return self.pruned() / max(1, math.prod(self.shape))

    def fraction_sparse_tiles(self) -> float:
        """Fraction of the weight's *elements* that lie in 2:4 tiles (tiles weighted by size)."""
        n, k = self.shape
        if not n * k:
            return 0.0
        return float((self.tile_kind.double() * tile_sizes(self.shape, self.tile)).sum()) / (n * k)

    def num_sparse_tiles(self) -> int:
        return int(self.tile_kind.sum())

    def fingerprint(self) -> str:
        """Stable hash of the tile map and mask (cached): identifies a (weight, mask) packing."""
        self._stats()
        return self._cache["fp"]

    def _stats(self) -> None:
        """Fingerprint and pruned count from the packed bits (1/8 of the bool mask's bytes)."""
        self._fresh()
        if "fp" in self._cache:
            return
        import numpy as np
        (n, k) = self.shape
        b = self.bits.numpy()[: (n * k + 7) // 8]
        if (n * k) % 8:                                       # clear the padding bits of the last byte
            b = b.copy()
            b[-1] &= np.uint8((0xFF << (8 - (n * k) % 8)) & 0xFF)
        c = nibble_popcounts(b)
        kept = int((c & np.uint8(0x0F)).sum(dtype=np.int64) + (c >> 4).sum(dtype=np.int64))
        self._cache.update(fp=mask_fingerprint(self.tile, self.shape, self.tile_kind, b), pruned=n * k - kept)

    # ---- validation ----------------------------------------------------------------------
    def validate(self, name: Optional[str] = None) -> "TileMask":
        """Raise ``ValueError`` naming ``name``, the first bad tile and group (``check_mask``);
        return self when valid.  The result is cached until the mask is edited in place."""
        self._fresh()
        if not self._cache.get("valid"):
            if self._mask is not None:
                check_mask(self.tile, self.tile_kind, self.shape, mask=self._mask, name=name)
            else:
                check_mask(self.tile, self.tile_kind, self.shape, bits=self._bits, name=name)
            self._cache["valid"] = True
        return self

    def is_valid(self) -> bool:
        """Whether the mask is valid (``validate`` without the exception)."""
        try:
            self.validate()
        except ValueError:
            return False
        return True


def _version(t: Optional[torch.Tensor]):
    """A tensor's in-place version counter (None for no tensor or an inference tensor, which has
    none and cannot be edited outside inference mode)."""
    if t is None or t.is_inference():
        return None
    return t._version


def mask_fingerprint(tile, shape, tile_kind: torch.Tensor, bits) -> str:
    """The fingerprint of a mask: sha1 of (tile, shape), the tile map and the mask's bits
    (``pack_bits`` order, padding bits zero), 16 hex digits.  Identifies a (weight, mask) packing."""
    h = hashlib.sha1()
    h.update(repr((tuple(tile), tuple(shape))).encode())
    h.update(tile_kind.numpy().tobytes())
    h.update(bits.tobytes())
    return h.hexdigest()[:16]
