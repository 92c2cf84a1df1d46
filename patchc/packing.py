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

import torch

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
    """Pack ``weight`` (out, in) under ``tile_mask`` (pruned weights are dropped)."""
    if tuple(weight.shape) != tile_mask.shape:
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match its mask {tile_mask.shape}")
    tile, grid = tile_mask.tile, tile_mask.grid
    (tn, tk), (nN, nK) = tile, grid
    dev = weight.device
    w = weight.detach()
    kinds = tile_mask.tile_kind.to(dev)
    if row_order is None:
        row_order = torch.arange(nN, dtype=torch.int64, device=dev)
    row_order = torch.as_tensor(row_order, device=dev).to(torch.int64)
    if row_order.numel() != nN or not torch.equal(torch.sort(row_order).values, torch.arange(nN, device=dev)):
        raise ValueError(f"row_order must be a permutation of range({nN})")

    kinds_p = kinds[row_order]                                             # [nN, nK] packed row order
    cols = torch.arange(nK, device=dev).expand(nN, nK)
    order = torch.sort((kinds_p == 0).to(torch.int64) * nK + cols, dim=1, stable=True).indices
    n_sparse = kinds_p.sum(1).to(torch.int64)
    is_sp = cols < n_sparse[:, None]                                       # [nN, nK] by slot
    rows = row_order[:, None].expand(nN, nK)
    sp_r, sp_c = rows[is_sp], order[is_sp]
    de_r, de_c = rows[~is_sp], order[~is_sp]

    # tile-major copy once, then whole-tile index_select (advanced indexing on the permuted
    # view was ~10x slower on CPU)
    wt = _tile_view(_padded(w, tile, grid, 0), tile, grid).reshape(nN * nK, tn, tk)
    dense_vals = wt.index_select(0, de_r * nK + de_c)   # dense tiles keep every weight: no masking

    S = int(sp_r.numel())
    n_words = -(-tk // 32)
    if S:
        sel = sp_r * nK + sp_c
        # pad the mask with a keep-2-of-4 pattern so padded groups of ragged 2:4 tiles keep exactly
        # 2 (zero) values like every other group
        mp = torch.tensor([True, True, False, False], device=dev).repeat(nN * tn, nK * tk // 4)
        mp[: w.shape[0], : w.shape[1]] = tile_mask.mask.to(dev)
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
    # two 4-bit codes per byte, four bytes per little-endian int32: group g at bits 4*(g % 8)
    code = torch.nn.functional.pad(code, (0, n_words * 8 - tk // 4))
    byte = code[..., 0::2] | (code[..., 1::2] << 4)
    word = byte.contiguous().view(torch.int32)
    if word.dim() != 3 or word.shape[-1] != n_words:          # big-endian hosts (not expected)
        raise RuntimeError("patchc packing assumes a little-endian host")

    zero = torch.zeros(1, dtype=torch.int64, device=dev)
    i32 = torch.int32
    return PackedWeight(
        shape=tuple(w.shape), tile=tile, dtype=w.dtype,
        row_order=row_order.to(i32),
        sparse_off=torch.cat([zero, n_sparse.cumsum(0)]).to(i32),
        dense_off=torch.cat([zero, (nK - n_sparse).cumsum(0)]).to(i32),
        sparse_kidx=sp_c.to(i32).contiguous(), dense_kidx=de_c.to(i32).contiguous(),
        sparse_vals=sparse_vals.contiguous(), sparse_meta=word, dense_vals=dense_vals.contiguous())


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


def unpack(p: PackedWeight) -> torch.Tensor:
    """The masked dense weight (N, K) back from the packed form (exact)."""
    (tn, tk), (nN, nK) = p.tile, p.grid
    dev = p.device
    tiles = torch.zeros(nN, nK, tn, tk, dtype=p.dtype, device=dev)
    ns = (p.sparse_off[1:] - p.sparse_off[:-1]).to(torch.int64)
    nd = (p.dense_off[1:] - p.dense_off[:-1]).to(torch.int64)
    rows = p.row_order.to(torch.int64)
    if p.num_sparse:
        tiles[rows.repeat_interleave(ns), p.sparse_kidx.long()] = decode_sparse(p.sparse_vals, p.sparse_meta, tk)
    if p.num_dense:
        tiles[rows.repeat_interleave(nd), p.dense_kidx.long()] = p.dense_vals
    full = tiles.permute(0, 2, 1, 3).reshape(nN * tn, nK * tk)
    return full[: p.shape[0], : p.shape[1]]


def unpack_tile_kind(p: PackedWeight) -> torch.Tensor:
    """uint8 [nN, nK] tile map in original order."""
    nN, nK = p.grid
    kind = torch.zeros(nN, nK, dtype=torch.uint8)
    ns = (p.sparse_off[1:] - p.sparse_off[:-1]).to(torch.int64).cpu()
    kind[p.row_order.long().cpu().repeat_interleave(ns), p.sparse_kidx.long().cpu()] = 1
    return kind
