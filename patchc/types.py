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

DENSE = 0
SPARSE24 = 1


def _check_tile(tile) -> tuple[int, int]:
    try:
        tn, tk = (int(t) for t in tile)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"tile must be a pair of ints (tn, tk), got {tile!r}") from exc
    if tn <= 0 or tk <= 0:
        raise ValueError(f"tile sizes must be positive, got {tile!r}")
    if tk % 4:
        raise ValueError(f"tile width tk={tk} must be a multiple of 4 (2:4 groups run along K)")
    return tn, tk


def grid_of(shape, tile) -> tuple[int, int]:
    """Number of tile-rows and tile-columns of an (N, K) weight."""
    n, k = shape
    return math.ceil(n / tile[0]), math.ceil(k / tile[1])


def expand_tiles(tile_kind: torch.Tensor, tile, shape) -> torch.Tensor:
    """Per-element view of a per-tile tensor, cropped to ``shape`` (no Python loop)."""
    tn, tk = tile
    n, k = shape
    return tile_kind.repeat_interleave(tn, 0)[:n].repeat_interleave(tk, 1)[:, :k]


def _tile_areas(shape, tile) -> torch.Tensor:
    """Number of weights in each tile (edge tiles are ragged) -> float64 [nN, nK]."""
    (n, k), (tn, tk) = shape, tile
    nN, nK = grid_of(shape, tile)
    rows = torch.full((nN,), float(tn), dtype=torch.float64)
    cols = torch.full((nK,), float(tk), dtype=torch.float64)
    if nN:
        rows[-1] = n - (nN - 1) * tn
    if nK:
        cols[-1] = k - (nK - 1) * tk
    return rows[:, None] * cols[None, :]


def sparse_allowed(tile, shape) -> torch.Tensor:
    """bool [nN, nK]: which tiles may be 2:4 (the last tile-column only if its width % 4 == 0)."""
    nn_, nk = grid_of(shape, tile)
    ok = torch.ones(nn_, nk, dtype=torch.bool)
    last_w = shape[1] - (nk - 1) * tile[1]
    if last_w % 4:
        ok[:, -1] = False
    return ok


class TileMask:
    """One weight's decision. ``mask`` is bool [N, K] in (out, in) orientation.

    Built from a bool mask, or lazily from its packed bits (``bits=``, ``shape=``: what a mask
    file stores, ``pack_bits`` order): then ``mask`` is unpacked on first use, and what a
    compile needs before packing -- shape, fingerprint, pruned count, validity, concatenation of
    sibling masks -- comes from the bits (a 0.7 B-model plan: ~1.5 s of unpacking to bool saved
    at load; the packer unpacks each mask when it packs its weight).  Treat it as immutable."""

    def __init__(self, tile, tile_kind: torch.Tensor, mask: Optional[torch.Tensor] = None, *,
                 bits: Optional[torch.Tensor] = None, shape=None):
        self.tile = _check_tile(tile)
        self._cache: dict = {}
        if mask is not None:
            if mask.dim() != 2:
                raise ValueError(f"mask must be 2-D (out, in), got shape {tuple(mask.shape)}")
            self._mask = mask.detach().to("cpu", torch.bool).contiguous()
            self._bits = None
            self._shape = tuple(int(x) for x in self._mask.shape)
        else:
            if bits is None or shape is None:
                raise ValueError("TileMask needs a bool mask, or its packed bits and shape")
            self._shape = tuple(int(x) for x in shape)
            if len(self._shape) != 2:
                raise ValueError(f"mask must be 2-D (out, in), got shape {self._shape}")
            bits = bits.detach().to("cpu", torch.uint8).reshape(-1).contiguous()
            if bits.numel() * 8 < math.prod(self._shape):
                raise ValueError(f"{bits.numel()} packed bytes cannot hold a {self._shape} mask")
            self._mask, self._bits = None, bits
        self.tile_kind = tile_kind.detach().to("cpu", torch.uint8).contiguous()
        want = grid_of(self.shape, self.tile)
        if tuple(self.tile_kind.shape) != want:
            raise ValueError(
                f"tile_kind has shape {tuple(self.tile_kind.shape)} but a {self.shape} weight with "
                f"tile {self.tile} has a {want[0]}x{want[1]} tile grid")

    def __repr__(self) -> str:
        return (f"TileMask(tile={self.tile}, shape={self.shape}, 2:4 tiles={self.num_sparse_tiles()}/"
                f"{self.tile_kind.numel()})")

    @property
    def mask(self) -> torch.Tensor:
        """bool [N, K]; unpacked from the bits on first use when built from them."""
        m = self._mask
        if m is None:
            m = self._mask = unpack_bits(self._bits, self._shape)
        return m

    def unpacked(self) -> torch.Tensor:
        """bool [N, K] for a one-off use, not kept: the held mask when there is one, else a fresh
        unpack of the bits (``mask`` would keep 1 byte per weight for the mask's lifetime)."""
        return self._mask if self._mask is not None else unpack_bits(self._bits, self._shape)

    @property
    def bits(self) -> torch.Tensor:
        """The mask packed 8 per byte (``pack_bits`` order), kept once computed."""
        b = self._bits
        if b is None:
            b = self._bits = pack_bits(self._mask)
        return b

    def held_nbytes(self) -> int:
        """Bytes this mask holds now: the bool mask once unpacked, plus its bits when kept."""
        return (0 if self._mask is None else self._mask.numel()) + (0 if self._bits is None else self._bits.numel())

    # ---- shape ---------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return self._shape  # type: ignore[return-value]

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.tile_kind.shape)  # type: ignore[return-value]

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def from_kinds(cls, tile, tile_kind: torch.Tensor, mask24: torch.Tensor) -> "TileMask":
        """Combine a tile map with a 2:4 mask (used inside sparse tiles): M = M_tile + (1-M_tile)·M_2:4."""
        tile = _check_tile(tile)
        kind = tile_kind.to(torch.uint8).cpu()
        per_elem = expand_tiles(kind, tile, tuple(mask24.shape)).bool()
        return cls(tile, kind, torch.where(per_elem, mask24.cpu().bool(), torch.ones_like(per_elem)))

    @classmethod
    def dense(cls, shape, tile) -> "TileMask":
        tile = _check_tile(tile)
        return cls(tile, torch.zeros(grid_of(shape, tile), dtype=torch.uint8),
                   torch.ones(tuple(shape), dtype=torch.bool))

    # ---- statistics ----------------------------------------------------------------------
    def pruned(self) -> int:
        """Number of pruned weights (cached; numpy's count: torch's bool ``sum`` took ~0.1 s for a
        4096x1536 mask, paid per site at every compile)."""
        n = self._cache.get("pruned")
        if n is None and self._mask is None:
            self.adopt_bits(self._bits)
            n = self._cache.get("pruned")
        if n is None:
            import numpy as np
            n = int(self.mask.numel() - np.count_nonzero(self.mask.numpy()))
            self._cache["pruned"] = n
        return n

    def sparsity(self) -> float:
        return self.pruned() / max(1, math.prod(self.shape))

    def fraction_sparse_tiles(self) -> float:
        """Fraction of the weight's *elements* that lie in 2:4 tiles (tiles weighted by size)."""
        n, k = self.shape
        if not n * k:
            return 0.0
        return float((self.tile_kind.double() * _tile_areas(self.shape, self.tile)).sum()) / (n * k)

    def num_sparse_tiles(self) -> int:
        return int(self.tile_kind.sum())

    def fingerprint(self) -> str:
        """Stable hash of the tile map and mask (cached): identifies a (weight, mask) packing."""
        fp = self._cache.get("fp")
        if fp is None and self._mask is None:
            self.adopt_bits(self._bits)
            fp = self._cache.get("fp")
        if fp is None:
            fp = self._cache["fp"] = mask_fingerprint(self.tile, self.shape, self.tile_kind, self.bits.numpy())
        return fp

    # ---- validation ----------------------------------------------------------------------
    def validate(self, name: str = "<weight>") -> "TileMask":
        """Raise ``ValueError`` naming the first bad tile and group; return self when valid."""
        if not self._cache.get("valid") and self._mask is None and "fp" not in self._cache:
            self.adopt_bits(self._bits)                 # settles validity on the bits when it can
        if self._cache.get("valid") or self._valid_fast():
            self._cache["valid"] = True
            return self
        self._validate_slow(name)
        return self

    def _valid_fast(self) -> bool:
        """Whole-mask check in numpy, ~40x faster than ``_validate_slow`` (which finds the first
        bad tile for the message): a dense tile keeps everything, a 2:4 group keeps exactly 2."""
        import numpy as np
        kind = self.tile_kind.numpy()
        if kind.size and int(kind.max()) > 1:
            return False
        if ((kind == SPARSE24) & ~sparse_allowed(self.tile, self.shape).numpy()).any():
            return False
        (n, k), (tn, tk) = self.shape, self.tile
        m = self.mask.numpy()
        k4 = k // 4 * 4
        if k4 < k and not m[:, k4:].all():               # a partial group lies in a dense tile
            return False
        if not k4:
            return True
        # kept per group of 4: the group's 4 bytes as one int32, summed into its top byte; by
        # blocks of tile-rows so the temporaries stay in cache (the per-group target is a broadcast)
        want = np.where(kind.astype(bool), 2, 4).astype(np.int32)                  # per tile
        g = tk // 4                                                                 # groups per tile
        step = max(1, (1 << 20) // max(1, tn * k4 // 4))                            # tile-rows per block
        for i in range(0, kind.shape[0], step):
            rows = m[i * tn: (i + step) * tn, :k4]
            kept = (np.ascontiguousarray(rows).view(np.int32) * np.int32(0x01010101)) >> 24     # [r, k4/4]
            r = kept.shape[0]
            full_r, full_c = r // tn * tn, (k4 // 4) // g * g                       # whole tiles
            w = want[i: i + step]
            if full_r and full_c and not np.array_equal(
                    kept[:full_r, :full_c].reshape(full_r // tn, tn, full_c // g, g), 
                    np.broadcast_to(w[: full_r // tn, : full_c // g, None, None].transpose(0, 2, 1, 3),
                                    (full_r // tn, tn, full_c // g, g))):
                return False
            if full_r < r or full_c < k4 // 4:                                      # ragged edges
                per = np.repeat(np.repeat(w, tn, axis=0)[:r], g, axis=1)[:, : k4 // 4]
                if not (np.array_equal(kept[full_r:], per[full_r:]) and np.array_equal(kept[:, full_c:], per[:, full_c:])):
                    return False
        return True

    def adopt_bits(self, bits: torch.Tensor) -> "TileMask":
        """Seed the cached statistics from the mask's packed bits (``pack_bits`` order, as a mask
        file stores them): fingerprint, pruned count and -- when K and tk are multiples of 8, so
        every byte lies in one tile -- validity, all on 1/8 of the bytes of the bool mask (loading
        a 0.6 B-weight plan spent ~1.5 s of its ~3.5 s on these from the bool mask)."""
        import numpy as np
        (n, k), (tn, tk) = self.shape, self.tile
        b = bits.detach().cpu().numpy().astype(np.uint8, copy=False)[: (n * k + 7) // 8]
        if (n * k) % 8:                                       # clear the padding bits of the last byte
            b = b.copy()
            b[-1] &= np.uint8((0xFF << (8 - (n * k) % 8)) & 0xFF)
        self._cache["fp"] = mask_fingerprint(self.tile, self.shape, self.tile_kind, b)
        # per-nibble popcounts: after these two steps each nibble of c holds its own bit count
        c = b - ((b >> 1) & np.uint8(0x55))
        c = (c & np.uint8(0x33)) + ((c >> 2) & np.uint8(0x33))
        self._cache["pruned"] = int(n * k - ((c & np.uint8(0x0F)).sum(dtype=np.int64) + (c >> 4).sum(dtype=np.int64)))
        kind = self.tile_kind.numpy()
        if k % 8 or tk % 8 or (kind.size and int(kind.max()) > 1) or \
                ((kind == SPARSE24) & ~sparse_allowed(self.tile, self.shape).numpy()).any():
            return self                                        # validate() checks the bool mask
        # a 2:4 tile's bytes have 2 bits in each nibble (0x22), a dense tile's 4 (0x44)
        want = np.where(kind.astype(bool), 0x22, 0x44).astype(np.uint8)
        c = c.reshape(n, k // 8)
        cols = (np.arange(k // 8) * 8) // tk
        rows = max(1, (1 << 22) // max(1, k // 8))
        for a in range(0, n, rows):
            exp = want[np.arange(a, min(n, a + rows)) // tn][:, cols]
            if not np.array_equal(c[a:a + rows], exp):
                return self
        self._cache["valid"] = True
        return self

    def _validate_slow(self, name: str) -> None:
        kind = self.tile_kind
        if kind.numel() and int(kind.max()) > 1:
            i, j = (kind > 1).nonzero()[0].tolist()
            raise ValueError(f"{name}: tile ({i}, {j}) has kind {int(kind[i, j])}; kinds are 0 (dense) and 1 (2:4)")
        bad_kind = (kind == SPARSE24) & ~sparse_allowed(self.tile, self.shape)
        if bad_kind.any():
            i, j = bad_kind.nonzero()[0].tolist()
            w = self.shape[1] - j * self.tile[1]
            raise ValueError(f"{name}: tile ({i}, {j}) is 2:4 but its width {w} is not a multiple of 4; "
                             "such an edge tile can only be dense")
        per = expand_tiles(kind, self.tile, self.shape).bool()
        bad_dense = ~per & ~self.mask
        if bad_dense.any():
            n, k = bad_dense.nonzero()[0].tolist()
            raise ValueError(f"{name}: tile ({n // self.tile[0]}, {k // self.tile[1]}) is dense but prunes "
                             f"weight ({n}, {k}); a dense tile keeps every weight")
        n_, k_ = self.shape
        k4 = k_ // 4 * 4
        if k4:
            counts = self.mask[:, :k4].reshape(n_, k4 // 4, 4).sum(-1)
            in_sparse = per[:, :k4:4]
            bad = in_sparse & (counts != 2)
            if bad.any():
                n, g = bad.nonzero()[0].tolist()
                k = 4 * g
                tk = self.tile[1]
                raise ValueError(
                    f"{name}: tile ({n // self.tile[0]}, {k // tk}) is 2:4 but group {(k % tk) // 4} "
                    f"(row {n}, columns {k}..{k + 3}) keeps {int(counts[n, g])} of 4 weights; 2:4 keeps exactly 2")
        raise ValueError(f"{name}: invalid tile mask")          # the fast check and this one disagree


def mask_fingerprint(tile, shape, tile_kind: torch.Tensor, bits) -> str:
    """The fingerprint of a mask: sha1 of (tile, shape), the tile map and the mask's bits
    (``pack_bits`` order, padding bits zero), 16 hex digits.  Identifies a (weight, mask) packing."""
    h = hashlib.sha1()
    h.update(repr((tuple(tile), tuple(shape))).encode())
    h.update(tile_kind.numpy().tobytes())
    h.update(bits.tobytes())
    return h.hexdigest()[:16]


# ---- bit packing (used by mask files and the fingerprint) ------------------------------------
def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool tensor → uint8 [ceil(numel/8)], MSB first (numpy.packbits order)."""
    import numpy as np
    return torch.from_numpy(np.packbits(mask.detach().cpu().reshape(-1).numpy()))


def unpack_bits(bits: torch.Tensor, shape) -> torch.Tensor:
    import numpy as np
    numel = math.prod(shape)
    if bits.numel() * 8 < numel:
        raise ValueError(f"{bits.numel()} packed bytes cannot hold a {tuple(shape)} mask")
    out = np.unpackbits(bits.cpu().numpy().astype(np.uint8, copy=False), count=numel)
    return torch.from_numpy(out.view(bool)).view(*shape)      # 0/1 bytes: a view, not a copy
