"""Tile geometry and validity, one home: what a valid tile shape is and what a valid mask is.

A weight W of shape (N, K) = (out, in) is cut into tiles of ``tile = (tn, tk)``; edge tiles may
be ragged.  A mask is valid when every dense tile keeps all its weights and every 2:4 tile keeps
exactly 2 of each group of 4 consecutive weights along K; a tile whose width is not a multiple of
4 (a ragged last tile-column) can only be dense.  :func:`check_tile` and :func:`check_mask` are the
only places these rules are written; every entry point (``TileMask``, ``MaskPlan`` construction,
``save``, ``load``, the pruners, ``infer_plan``) calls them.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

DENSE = 0
SPARSE24 = 1


def check_tile(tile, shape=None, name: Optional[str] = None) -> tuple[int, int]:
    """``(tn, tk)`` as ints, or ``ValueError`` naming the tile (and ``name``/``shape``) and what is
    wrong: not a pair of ints, a size < 1, a width that is not a multiple of 4 (2:4 groups run
    along K), or -- when ``shape`` (out, in) is given -- a tile larger than the weight."""
    where = f"{name}: " if name else ""
    try:
        tn, tk = tile
        if any(isinstance(v, bool) or int(v) != v for v in (tn, tk)):
            raise TypeError
        tn, tk = int(tn), int(tk)
    except (TypeError, ValueError):
        raise ValueError(f"{where}tile must be a pair of ints (rows, cols), got {tile!r}") from None
    if tn < 1 or tk < 1:
        which = "height (rows)" if tn < 1 else "width (cols)"
        raise ValueError(f"{where}tile {(tn, tk)}: the tile {which} must be at least 1")
    if tk % 4:
        raise ValueError(f"{where}tile {(tn, tk)}: the tile width {tk} is not a multiple of 4 "
                         "(2:4 groups of 4 weights run along K)")
    if shape is not None and (tn > shape[0] or tk > shape[1]):
        raise ValueError(f"{where}tile {(tn, tk)} is larger than the weight {tuple(shape)} (out, in)")
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


def tile_sizes(shape, tile) -> torch.Tensor:
    """Number of real (unpadded) weights in each tile (edge tiles are ragged) -> float64 [nN, nK]."""
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
    if nk and last_w % 4:
        ok[:, -1] = False
    return ok


def nibble_popcounts(b: np.ndarray) -> np.ndarray:
    """uint8 array -> per byte, its bit count per nibble: high nibble's count in the high nibble,
    low's in the low (two SWAR steps; ~20x faster than unpacking to bool)."""
    c = b - ((b >> 1) & np.uint8(0x55))
    return (c & np.uint8(0x33)) + ((c >> 2) & np.uint8(0x33))


# ---- bit packing (mask files, fingerprints) ---------------------------------------------------
def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool tensor -> uint8 [ceil(numel/8)], MSB first (numpy.packbits order)."""
    return torch.from_numpy(np.packbits(mask.detach().cpu().reshape(-1).numpy()))


def unpack_bits(bits: torch.Tensor, shape) -> torch.Tensor:
    """bool tensor of ``shape`` from ``pack_bits`` output (a view of the unpacked bytes)."""
    numel = math.prod(shape)
    if bits.numel() * 8 < numel:
        raise ValueError(f"{bits.numel()} packed bytes cannot hold a {tuple(shape)} mask")
    out = np.unpackbits(bits.detach().cpu().numpy().astype(np.uint8, copy=False).reshape(-1), count=numel)
    return torch.from_numpy(out.view(bool)).view(*shape)      # 0/1 bytes: a view, not a copy


# ---- the one mask validator -------------------------------------------------------------------
_BLOCK = 1 << 20          # groups checked per block: keeps the temporaries in cache


def check_mask(tile, tile_kind: torch.Tensor, shape, *, mask: Optional[torch.Tensor] = None,
               bits: Optional[torch.Tensor] = None, name: Optional[str] = None) -> None:
    """Raise ``ValueError`` naming ``name``, the first bad tile and, inside it, the group or weight
    at fault; return ``None`` for a valid mask.

    The mask is given as bool ``mask`` [N, K] or as ``bits`` (``np.packbits`` order of the
    flattened mask, what a mask file stores).  Kept weights are counted per group of 4 in blocks
    of rows -- on the bits by nibble popcounts when K % 4 == 0 (every group is then one nibble),
    else on the bool mask -- and compared with 2 (2:4 tile) or 4 (dense tile)."""
    where = f"{name}: " if name else ""
    (n, k), (tn, tk) = (int(shape[0]), int(shape[1])), check_tile(tile)
    kind = tile_kind.detach().cpu().numpy()
    if kind.size and int(kind.max()) > 1:
        i, j = np.argwhere(kind > 1)[0].tolist()
        raise ValueError(f"{where}tile ({i}, {j}) has kind {int(kind[i, j])}; kinds are 0 (dense) and 1 (2:4)")
    bad_kind = (kind == SPARSE24) & ~sparse_allowed((tn, tk), (n, k)).numpy()
    if bad_kind.any():
        i, j = np.argwhere(bad_kind)[0].tolist()
        raise ValueError(f"{where}tile ({i}, {j}) is 2:4 but its width {k - j * tk} is not a multiple of 4; "
                         "such an edge tile can only be dense")
    if mask is None and (bits is None or k % 4):
        mask = unpack_bits(bits, (n, k))
    m = None if mask is None else mask.detach().cpu().numpy()
    b = None if m is not None else bits.detach().cpu().numpy().astype(np.uint8, copy=False).reshape(-1)
    G, k4 = k // 4, k // 4 * 4
    if m is not None and k4 < k:                         # the partial last group: in a dense tile
        tail = ~m[:, k4:]
        if tail.any():
            r, c = np.argwhere(tail)[0].tolist()
            _raise_dense(where, (tn, tk), r, k4 + c)
    if not G:
        return
    want = np.repeat(np.where(kind.astype(bool), 2, 4).astype(np.uint8), tk // 4, axis=1)[:, :G]  # [nN, G]
    step = max(2, _BLOCK // G // 2 * 2)                  # rows per block, even (whole bytes of bits)
    for a in range(0, n, step):
        z = min(n, a + step)
        if m is not None:
            rows = np.ascontiguousarray(m[a:z, :k4])
            kept = ((rows.view(np.int32) * np.int32(0x01010101)) >> 24).astype(np.uint8)   # [r, G]
        else:
            lo, hi = a * G, z * G                          # nibble range of these rows
            c = nibble_popcounts(b[lo // 2: (hi + 1) // 2])
            nib = np.empty(2 * c.size, np.uint8)
            nib[0::2], nib[1::2] = c >> 4, c & np.uint8(0x0F)                                 # MSB first
            kept = nib[lo % 2: lo % 2 + hi - lo].reshape(z - a, G)
        exp = want[np.arange(a, z) // tn]
        if not np.array_equal(kept, exp):
            r, g = np.argwhere(kept != exp)[0].tolist()
            r += a
            if exp[r - a, g] == 4:
                group = m[r, 4 * g: 4 * g + 4] if m is not None else _group_bits(b, r * G + g)
                _raise_dense(where, (tn, tk), r, 4 * g + int(np.argmin(group)))
            c0 = 4 * g
            raise ValueError(f"{where}tile ({r // tn}, {c0 // tk}) is 2:4 but group {(c0 % tk) // 4} "
                             f"(row {r}, columns {c0}..{c0 + 3}) keeps {int(kept[r - a, g])} of 4 weights; "
                             "2:4 keeps exactly 2")


def _group_bits(b: np.ndarray, nibble: int) -> np.ndarray:
    v = (int(b[nibble // 2]) >> (4 if nibble % 2 == 0 else 0)) & 0xF
    return np.array([(v >> (3 - i)) & 1 for i in range(4)], dtype=bool)


def _raise_dense(where: str, tile, r: int, c: int):
    raise ValueError(f"{where}tile ({r // tile[0]}, {c // tile[1]}) is dense but prunes weight ({r}, {c}); "
                     "a dense tile keeps every weight")
