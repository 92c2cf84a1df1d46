"""The compact encoding of a mask in a plan file (format version 2).

A dense tile keeps every weight, so it costs nothing beyond its entry in the tile map.  A 2:4
tile keeps 2 of every group of 4 weights along K: one of 6 patterns, stored as a 4-bit code,
two codes per byte (the first group in the high nibble).  The codes of one weight list the groups
of its 2:4 tiles in row-major order over the whole (out, in) weight, skipping the groups of dense
tiles.  Code ``c`` keeps the positions ``PATTERNS[c]`` of its group.

A SmolLM2-135M plan at 25 % sparsity (half of the weights in 2:4 tiles) takes 6.6 MB this way
against 13.3 MB for one bit per weight (format version 1, still read).
"""
from __future__ import annotations

import numpy as np
import torch

from .tiles import grid_of

PATTERNS = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))
# a group's 4 keep-bits as a nibble, position 0 in the high bit (np.packbits order)
_CODE_TO_NIB = np.array([(8 >> i) | (8 >> j) for i, j in PATTERNS], dtype=np.uint8)
_NIB_TO_CODE = np.full(16, 255, dtype=np.uint8)
_NIB_TO_CODE[_CODE_TO_NIB] = np.arange(len(PATTERNS), dtype=np.uint8)
DESCRIPTION = ("2:4 codes: 4 bits per group of 4 weights in a 2:4 tile (row-major over the (out, in) weight, "
               "groups of dense tiles skipped; two per byte, high nibble first); code c keeps positions "
               + ", ".join(f"{c}={i}{j}" for c, (i, j) in enumerate(PATTERNS)))


def sparse_groups(tile, tile_kind: torch.Tensor, shape) -> np.ndarray:
    """bool [N, K // 4]: which whole groups of 4 lie in a 2:4 tile."""
    (n, k), (tn, tk) = shape, tile
    kind = tile_kind.numpy().astype(bool)
    per_col = np.repeat(kind, tk // 4, axis=1)[:, : k // 4]                 # [nN, K // 4]
    return per_col[np.arange(n) // tn]


def _nibbles(tm) -> np.ndarray:
    """uint8 [N, K // 4]: the keep-bits of every whole group of 4 as a nibble."""
    n, k = tm.shape
    g = k // 4
    if k % 4 == 0:
        b = tm.bits.numpy()[: (n * g + 1) // 2]
        nib = np.empty(2 * b.size, np.uint8)
        nib[0::2], nib[1::2] = b >> 4, b & np.uint8(0x0F)
        return nib[: n * g].reshape(n, g)
    m = tm.unpacked().numpy()[:, : 4 * g].reshape(n, g, 4).astype(np.uint8)
    return (m[..., 0] << 3) | (m[..., 1] << 2) | (m[..., 2] << 1) | m[..., 3]


def encode(tm) -> tuple[torch.Tensor, int]:
    """(codes uint8 [ceil(S / 2)], S): the 4-bit codes of the S groups in the 2:4 tiles of a valid
    TileMask."""
    sel = sparse_groups(tm.tile, tm.tile_kind, tm.shape)
    codes = _NIB_TO_CODE[_nibbles(tm)[sel]]
    if codes.size and int(codes.max()) == 255:                 # only an unvalidated mask gets here
        raise ValueError("encode: a group of a 2:4 tile does not keep exactly 2 of 4 weights")
    s = int(codes.size)
    if s % 2:
        codes = np.append(codes, np.uint8(0))
    return torch.from_numpy((codes[0::2] << 4) | codes[1::2]), s


def decode(tile, tile_kind: torch.Tensor, shape, codes: torch.Tensor, where: str = "") -> dict:
    """The arguments of ``TileMask`` for the mask the codes describe: ``{"bits": ..., "shape":
    ...}`` when K % 4 == 0 (groups are whole nibbles of the bits), else ``{"mask": ...}``.
    ``ValueError`` (prefixed by ``where``) for a wrong code count or an undefined code, naming the
    tile and group."""
    (n, k), (tn, tk) = shape, tile
    if tuple(tile_kind.shape) != grid_of(shape, tile):
        raise ValueError(f"{where}tile_kind has shape {tuple(tile_kind.shape)}; a {tuple(shape)} weight with tile "
                         f"{tuple(tile)} has a {grid_of(shape, tile)} tile grid")
    sel = sparse_groups(tile, tile_kind, shape)
    s = int(sel.sum())
    raw = codes.numpy().astype(np.uint8, copy=False).reshape(-1)
    if raw.size != (s + 1) // 2:
        raise ValueError(f"{where}{raw.size} code bytes, but its {s} groups in 2:4 tiles need {(s + 1) // 2}")
    c = np.empty(2 * raw.size, np.uint8)
    c[0::2], c[1::2] = raw >> 4, raw & np.uint8(0x0F)
    c = c[:s]
    if s and int(c.max()) >= len(PATTERNS):
        i = int(np.argmax(c >= len(PATTERNS)))
        r, g = (int(v[i]) for v in np.nonzero(sel))
        col = 4 * g
        raise ValueError(f"{where}tile ({r // tn}, {col // tk}) group {(col % tk) // 4} (row {r}, columns "
                         f"{col}..{col + 3}) has code {int(c[i])}; codes are 0..{len(PATTERNS) - 1}")
    g = k // 4
    nib = np.full((n, g), 0x0F, np.uint8)
    nib[sel] = _CODE_TO_NIB[c]
    if k % 4 == 0:
        flat = nib.reshape(-1)
        if flat.size % 2:
            flat = np.append(flat, np.uint8(0))
        return {"bits": torch.from_numpy((flat[0::2] << 4) | flat[1::2]), "shape": (n, k)}
    m = np.ones((n, k), dtype=bool)
    m[:, : 4 * g] = np.unpackbits(nib[..., None], axis=-1)[..., 4:].reshape(n, 4 * g).astype(bool)
    return {"mask": torch.from_numpy(m)}


def encoded_nbytes(tm) -> int:
    """Bytes of a TileMask's codes in the compact encoding (tile map excluded)."""
    return (int(sparse_groups(tm.tile, tm.tile_kind, tm.shape).sum()) + 1) // 2


__all__ = ["PATTERNS", "DESCRIPTION", "encode", "decode", "sparse_groups", "encoded_nbytes"]

