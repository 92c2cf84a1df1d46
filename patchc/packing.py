"""``PackedWeight``: a masked weight in the kernels' format, and ``pack``/``unpack`` (vectorised).

Format, for a weight (N, K) with tile (tn, tk) and a tile grid (nN, nK); every tile is stored
padded to the full tn x tk with zeros (ragged edges):

* ``row_order[i]``: the original tile-row stored as packed tile-row ``i`` (a permutation chosen by
  the layout; kernels write the outputs of packed row i back to rows of ``row_order[i]``).
* Within each packed tile-row its 2:4 tiles come first, then its dense tiles, each kind in one
  contiguous buffer: the tiles of packed row i are ``sparse_off[i]:sparse_off[i+1]`` of the
  sparse buffers and ``dense_off[i]:dense_off[i+1]`` of the dense buffer.
* ``sparse_kidx`` / ``dense_kidx``: the tile-column (K tile index) of every stored tile.
* ``dense_vals``   [D, tn, tk]       the dense tiles, row-major.
* ``sparse_vals``  [S, tn, tk // 2]  the 2 kept values of every group of 4 along K, in order.
* ``sparse_meta``  int32 [S, tn, ceil(tk / 32)]: the positions (0..3) of the kept values, 2 bits
  each; group g of a row sits in word g // 8 at bits 4·(g % 8): ``i0 | i1 << 2`` with i0 < i1.

So a 2:4 tile costs tk/2 values + tk/8 bytes per row: 56.25 % of its dense bytes in fp16/bf16.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .dtypes import SAME_SIZE_INT
from .types import TileMask, grid_of


@dataclass(eq=False)
class PackedWeight:
    shape: tuple[int, int]
    tile: tuple[int, int]
    dtype: torch.dtype
    row_order: torch.Tensor     # int32 [nN]
    sparse_off: torch.Tensor    # int32 [nN + 1]
    dense_off: torch.Tensor     # int32 [nN + 1]
    sparse_kidx: torch.Tensor   # int32 [S]
    dense_kidx: torch.Tensor    # int32 [D]
    sparse_vals: torch.Tensor   # dtype [S, tn, tk // 2]
    sparse_meta: torch.Tensor   # int32 [S, tn, ceil(tk / 32)]
    dense_vals: torch.Tensor    # dtype [D, tn, tk]

    @property
    def grid(self) -> tuple[int, int]:
        return grid_of(self.shape, self.tile)

    @property
    def device(self) -> torch.device:
        return self.dense_vals.device

    @property
    def num_sparse(self) -> int:
        return int(self.sparse_kidx.numel())

    @property
    def num_dense(self) -> int:
        return int(self.dense_kidx.numel())

    def buffers(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in ("row_order", "sparse_off", "dense_off", "sparse_kidx",
                                              "dense_kidx", "sparse_vals", "sparse_meta", "dense_vals")}

    def nbytes(self) -> int:
        """Bytes of the packed form (values, metadata and index arrays)."""
        return sum(t.numel() * t.element_size() for t in self.buffers().values())

    def dense_nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * torch.empty((), dtype=self.dtype).element_size()

    def to(self, device) -> "PackedWeight":
        kw = {k: v.to(device) for k, v in self.buffers().items()}
        return PackedWeight(self.shape, self.tile, self.dtype, **kw)


def balanced_row_order(tile_kind: torch.Tensor) -> torch.Tensor:
    """Tile-rows with the most dense tiles (the most work) first, ties in original order."""
    dense = (tile_kind == 0).sum(1)
    return torch.sort(-dense, stable=True).indices.to(torch.int32)


def _tile_view(x: torch.Tensor, tile, grid) -> torch.Tensor:
    """[nN*tn, nK*tk] -> [nN, nK, tn, tk] (a view)."""
    (tn, tk), (nN, nK) = tile, grid
    return x.view(nN, tn, nK, tk).permute(0, 2, 1, 3)


def _padded(x: torch.Tensor, tile, grid, fill) -> torch.Tensor:
    """``x`` padded to the full tile grid (no copy when it already fits)."""
    ph, pw = grid[0] * tile[0] - x.shape[0], grid[1] * tile[1] - x.shape[1]
    if not ph and not pw:
        return x.contiguous()
    if x.dtype == torch.bool:
        return torch.nn.functional.pad(x.view(torch.uint8), (0, pw, 0, ph), value=int(fill)).view(torch.bool)
    return torch.nn.functional.pad(x, (0, pw, 0, ph), value=fill)


def pack(weight: torch.Tensor, tile_mask: TileMask, row_order: Optional[torch.Tensor] = None) -> PackedWeight:
    """Pack ``weight`` (out, in) under ``tile_mask`` (pruned weights are dropped).

    CPU weights take a numpy path (fancy-indexed tile gathers and a flat ``take`` of the kept
    values): 0.4-0.6 GB/s on one busy core for a 4096x1536 fp32 weight, ~10x the torch ops it
    replaced (``masked_select`` alone ran at ~60 M elements/s).  Other devices use torch ops.
    """
    if tuple(weight.shape) != tile_mask.shape:
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match its mask {tile_mask.shape}")
    tile, grid = tile_mask.tile, tile_mask.grid
    (tn, tk), (nN, nK) = tile, grid
    dev = weight.device
    w = weight.detach()
    if row_order is None:
        row_order = torch.arange(nN, dtype=torch.int64)
    row_order = torch.as_tensor(row_order).to(device="cpu", dtype=torch.int64)
    if row_order.numel() != nN or not torch.equal(torch.sort(row_order).values, torch.arange(nN)):
        raise ValueError(f"row_order must be a permutation of range({nN})")

    # the tile bookkeeping is tiny ([nN, nK]): always on the CPU
    kinds_p = tile_mask.tile_kind[row_order]                               # [nN, nK] packed row order
    cols = torch.arange(nK).expand(nN, nK)
    order = torch.sort((kinds_p == 0).to(torch.int64) * nK + cols, dim=1, stable=True).indices
    n_sparse = kinds_p.sum(1).to(torch.int64)
    is_sp = cols < n_sparse[:, None]                                       # [nN, nK] by slot
    rows = row_order[:, None].expand(nN, nK)
    sp_r, sp_c = rows[is_sp], order[is_sp]
    de_r, de_c = rows[~is_sp], order[~is_sp]

    if dev.type == "cpu" and w.element_size() in SAME_SIZE_INT:
        dense_vals, sparse_vals, word = _pack_values_numpy(w, tile_mask, sp_r, sp_c, de_r, de_c)
    else:
        dense_vals, sparse_vals, word = _pack_values_torch(w, tile_mask, sp_r.to(dev), sp_c.to(dev),
                                                           de_r.to(dev), de_c.to(dev))
    if word.dim() != 3 or word.shape[-1] != -(-tk // 32):          # big-endian hosts (not expected)
        raise RuntimeError("patchc packing assumes a little-endian host")

    zero = torch.zeros(1, dtype=torch.int64)
    i32 = torch.int32
    return PackedWeight(
        shape=tuple(w.shape), tile=tile, dtype=w.dtype,
        row_order=row_order.to(dev, i32),
        sparse_off=torch.cat([zero, n_sparse.cumsum(0)]).to(dev, i32),
        dense_off=torch.cat([zero, (nK - n_sparse).cumsum(0)]).to(dev, i32),
        sparse_kidx=sp_c.to(dev, i32).contiguous(), dense_kidx=de_c.to(dev, i32).contiguous(),
        sparse_vals=sparse_vals.contiguous(), sparse_meta=word, dense_vals=dense_vals.contiguous())


def _padded_mask(tile_mask: TileMask, dev) -> torch.Tensor:
    """The mask on the full tile grid; padded groups of ragged 2:4 tiles keep a 2-of-4 pattern
    (positions 0, 1) so they hold exactly 2 (zero) values like every other group."""
    (tn, tk), (nN, nK) = tile_mask.tile, tile_mask.grid
    m = tile_mask.mask
    if m.shape == (nN * tn, nK * tk):
        return m.to(dev)
    mp = torch.tensor([True, True, False, False], device=dev).repeat(nN * tn, nK * tk // 4)
    mp[: m.shape[0], : m.shape[1]] = m.to(dev)
    return mp


def _meta_words(code: torch.Tensor, tk: int) -> torch.Tensor:
    """uint8 codes [S, tn, tk/4] -> int32 [S, tn, ceil(tk/32)]: two 4-bit codes per byte, four
    bytes per little-endian int32, so group g sits at bits 4*(g % 8) of word g // 8."""
    n_words = -(-tk // 32)
    if n_words * 8 != tk // 4:
        code = torch.nn.functional.pad(code, (0, n_words * 8 - tk // 4))
    byte = code[..., 0::2] | (code[..., 1::2] << 4)
    return byte.contiguous().view(torch.int32)


def _meta_words_numpy(code: np.ndarray, tk: int) -> torch.Tensor:
    """``_meta_words`` in numpy (torch's strided uint8 ops were ~30x slower on CPU)."""
    n_words = -(-tk // 32)
    if n_words * 8 != tk // 4:
        code = np.pad(code, ((0, 0), (0, 0), (0, n_words * 8 - tk // 4)))
    byte = code[..., 0::2] | (code[..., 1::2] << 4)
    return torch.from_numpy(np.ascontiguousarray(byte).view(np.int32))


# ---- CPU: numpy ------------------------------------------------------------------------------
# code (i0 | i1 << 2) of a 4-bit keep pattern (bit j = weight j kept); only the six 2-of-4
# patterns occur in a 2:4 tile
_CODE_OF_PATTERN = np.full(16, 4, dtype=np.uint8)
for _pat, (_i0, _i1) in {0b0011: (0, 1), 0b0101: (0, 2), 0b0110: (1, 2), 0b1001: (0, 3), 0b1010: (1, 3),
                         0b1100: (2, 3)}.items():
    _CODE_OF_PATTERN[_pat] = _i0 | _i1 << 2
_CHUNK_GROUPS = 1 << 19          # groups of 4 per chunk: bounds the int64 index temporaries (8 MiB)


def _group_codes(m4: np.ndarray) -> np.ndarray:
    """bool [..., tk] (tk % 4 == 0, C-contiguous) -> uint8 codes [..., tk/4].  The 4 mask bytes of
    a group read as one little-endian int32 b0 | b1<<8 | b2<<16 | b3<<24; multiplying by
    2^21 + 2^14 + 2^7 + 1 moves bit 8j to bit 21 + j with no carries below bit 21."""
    v = m4.view(np.int32)
    return _CODE_OF_PATTERN[((v * np.int32(0x204081)) >> 21) & 0xF]


def _pack_values_numpy(w, tile_mask, sp_r, sp_c, de_r, de_c):
    (tn, tk), (nN, nK) = tile_mask.tile, tile_mask.grid
    kp = nK * tk
    n_words = -(-tk // 32)
    wn = _padded(w, tile_mask.tile, tile_mask.grid, 0).view(SAME_SIZE_INT[w.element_size()]).numpy()
    w4 = wn.reshape(nN, tn, nK, tk)
    dense_vals = torch.from_numpy(w4[de_r.numpy(), :, de_c.numpy(), :]).view(w.dtype)      # [D, tn, tk]
    S = int(sp_r.numel())
    vals = np.empty((S, tn, tk // 4, 2), dtype=wn.dtype)
    meta = np.empty((S, tn, n_words), dtype=np.int32)
    if S:
        r, c = sp_r.numpy(), sp_c.numpy()
        m4 = _padded_mask(tile_mask, "cpu").numpy().reshape(nN, tn, nK, tk)
        flat = wn.reshape(-1)
        # by chunks of tiles: the temporaries (mask tiles, codes, int64 indices) stay a few MiB,
        # which matters where fresh memory is slow to fault in (~0.2 GB/s on a cold VM)
        step = max(1, _CHUNK_GROUPS // (tn * tk // 4))
        for a in range(0, S, step):
            b = min(S, a + step)
            code = _group_codes(np.ascontiguousarray(m4[r[a:b], :, c[a:b], :]))          # [s, tn, tk/4]
            # the kept values by a flat take: group (s, a, g) starts at (r_s tn + a) kp + c_s tk + 4 g
            flat.take(_kept_index(r[a:b], c[a:b], code, tile_mask.tile, kp), out=vals[a:b], mode="clip")
            meta[a:b] = _meta_words_numpy(code, tk).numpy()
    sparse_vals = torch.from_numpy(vals.reshape(S, tn, tk // 2)).view(w.dtype)
    return dense_vals, sparse_vals, torch.from_numpy(meta)


# ---- other devices: torch ops ----------------------------------------------------------------
def _pack_values_torch(w, tile_mask, sp_r, sp_c, de_r, de_c):
    tile, grid = tile_mask.tile, tile_mask.grid
    (tn, tk), (nN, nK) = tile, grid
    dev = w.device
    # tile-major copy once, then whole-tile index_select (advanced indexing on the permuted
    # view was ~10x slower on CPU)
    wt = _tile_view(_padded(w, tile, grid, 0), tile, grid).reshape(nN * nK, tn, tk)
    dense_vals = wt.index_select(0, de_r * nK + de_c)   # dense tiles keep every weight: no masking
    S = int(sp_r.numel())
    if S:
        sel = sp_r * nK + sp_c
        mp = _padded_mask(tile_mask, dev)
        sm = _tile_view(mp, tile, grid).reshape(nN * nK, tn, tk).index_select(0, sel)     # [S, tn, tk]
        sparse_vals = wt.index_select(0, sel).masked_select(sm).view(S, tn, tk // 2)  # kept, in order
        b = sm.view(S, tn, tk // 4, 4).to(torch.uint8).unbind(-1)
        # first and last kept position of each group (exactly two are kept)
        i0 = (1 - b[0]) * (1 + (1 - b[1]) * (1 + (1 - b[2])))
        i1 = b[3] * 3 + (1 - b[3]) * (b[2] * 2 + (1 - b[2]) * b[1])
        code = i0 | (i1 << 2)                                              # uint8 [S, tn, tk/4]
    else:
        sparse_vals = w.new_zeros(0, tn, tk // 2)
        code = torch.zeros(0, tn, tk // 4, dtype=torch.uint8, device=dev)
    return dense_vals, sparse_vals, _meta_words(code, tk)


def decode_sparse(sparse_vals: torch.Tensor, sparse_meta: torch.Tensor, tk: int) -> torch.Tensor:
    """Expand compressed 2:4 tiles [S, tn, tk/2] to dense [S, tn, tk]."""
    s, tn = sparse_vals.shape[:2]
    dev = sparse_vals.device
    g = torch.arange(tk // 4, device=dev)
    words = sparse_meta.to(torch.int64) & 0xFFFFFFFF
    code = (words[..., g // 8] >> (4 * (g % 8))) & 0xF                    # [S, tn, tk/4]
    idx = torch.stack([code & 3, code >> 2], -1)                          # [S, tn, tk/4, 2]
    out = torch.zeros(s, tn, tk // 4, 4, dtype=sparse_vals.dtype, device=dev)
    out.scatter_(-1, idx, sparse_vals.reshape(s, tn, tk // 4, 2))
    return out.reshape(s, tn, tk)


def _kept_index(r: np.ndarray, c: np.ndarray, code: np.ndarray, tile, kp: int) -> np.ndarray:
    """Flat int64 positions in the padded (nN tn, kp) weight of the two kept values of every
    group of the 2:4 tiles at tile coordinates (r, c), codes uint8 [S, tn, tk/4] -> [S, tn, tk/4, 2].
    In bounds by construction, so ``take`` / ``put`` run with ``mode="clip"`` (no bounds check: 2x)."""
    tn, tk = tile
    row_off = np.arange(tn, dtype=np.int64)[:, None] * kp + np.arange(0, tk, 4, dtype=np.int64)[None, :]
    base = (r.astype(np.int64) * (tn * kp) + c.astype(np.int64) * tk)[:, None, None] + row_off
    idx = np.empty(code.shape + (2,), dtype=np.int64)
    np.add(base, code & 3, out=idx[..., 0])
    np.add(base, code >> 2, out=idx[..., 1])
    return idx


def _unpack_numpy(p: PackedWeight) -> torch.Tensor:
    """``unpack`` for CPU tensors: ~3x faster than the torch scatter (100 ms -> ~30 ms for a
    4096x1536 fp32 weight on a busy 2-core machine)."""
    (tn, tk), (nN, nK) = p.tile, p.grid
    kp = nK * tk
    it = SAME_SIZE_INT[p.sparse_vals.element_size()]
    full = np.zeros((nN, tn, nK, tk), dtype=torch.empty((), dtype=it).numpy().dtype)
    rows = p.row_order.numpy().astype(np.int64)
    if p.num_dense:
        nd = np.diff(p.dense_off.numpy())
        full[np.repeat(rows, nd), :, p.dense_kidx.numpy(), :] = p.dense_vals.view(it).numpy()
    if p.num_sparse:
        r, c = np.repeat(rows, np.diff(p.sparse_off.numpy())), p.sparse_kidx.numpy()
        byte = p.sparse_meta.contiguous().numpy().view(np.uint8)           # [S, tn, 4 n_words]
        code = np.empty(byte.shape[:-1] + (byte.shape[-1] * 2,), dtype=np.uint8)
        code[..., 0::2] = byte & 0xF
        code[..., 1::2] = byte >> 4
        code = code[..., : tk // 4]
        vals = p.sparse_vals.contiguous().view(it).numpy().reshape(code.shape + (2,))
        flat = full.reshape(-1)
        step = max(1, _CHUNK_GROUPS // (tn * tk // 4))
        for a in range(0, len(r), step):
            b = min(len(r), a + step)
            flat.put(_kept_index(r[a:b], c[a:b], code[a:b], p.tile, kp), vals[a:b], mode="clip")
    out = torch.from_numpy(full).view(p.dtype).view(nN * tn, kp)
    return out[: p.shape[0], : p.shape[1]]


def unpack(p: PackedWeight) -> torch.Tensor:
    """The masked dense weight (N, K) back from the packed form (exact)."""
    (tn, tk), (nN, nK) = p.tile, p.grid
    dev = p.device
    if dev.type == "cpu" and p.sparse_vals.element_size() in SAME_SIZE_INT:
        return _unpack_numpy(p)
    tiles = torch.zeros(nN, nK, tn, tk, dtype=p.dtype, device=dev)
    ns = (p.sparse_off[1:] - p.sparse_off[:-1]).to(torch.int64)
    nd = (p.dense_off[1:] - p.dense_off[:-1]).to(torch.int64)
    rows = p.row_order.to(torch.int64)
    # output_size: no device-to-host sync, so a CUDA-graph capture may unpack (release_dense)
    if p.num_sparse:
        tiles[rows.repeat_interleave(ns, output_size=p.num_sparse), p.sparse_kidx.long()] = \
            decode_sparse(p.sparse_vals, p.sparse_meta, tk)
    if p.num_dense:
        tiles[rows.repeat_interleave(nd, output_size=p.num_dense), p.dense_kidx.long()] = p.dense_vals
    full = tiles.permute(0, 2, 1, 3).reshape(nN * tn, nK * tk)
    return full[: p.shape[0], : p.shape[1]]


def unpack_tile_kind(p: PackedWeight) -> torch.Tensor:
    """uint8 [nN, nK] tile map in original order."""
    nN, nK = p.grid
    kind = torch.zeros(nN, nK, dtype=torch.uint8)
    ns = (p.sparse_off[1:] - p.sparse_off[:-1]).to(torch.int64).cpu()
    kind[p.row_order.long().cpu().repeat_interleave(ns), p.sparse_kidx.long().cpu()] = 1
    return kind


def packed_nbytes(tile_mask, dtype) -> int:
    """Bytes of ``pack(weight, tile_mask)`` (values, metadata, index arrays) without packing."""
    e = torch.empty((), dtype=dtype).element_size()
    (tn, tk), (n_n, n_k) = tile_mask.tile, tile_mask.grid
    s = tile_mask.num_sparse_tiles()
    d = n_n * n_k - s
    return 4 * n_n + 8 * (n_n + 1) + 4 * (s + d) + s * tn * (tk // 2) * e + s * tn * -(-tk // 32) * 4 + d * tn * tk * e
