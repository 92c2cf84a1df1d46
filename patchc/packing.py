"""``PackedWeight``: a masked weight in the kernels' format, ``pack`` / ``unpack`` and their sizes.

A weight (N, K) is cut into tiles (tn, tk) on a grid (nN, nK); ragged edge tiles are stored at
their true size (no padding), so a layer never packs larger than dense.  The tile-rows are
stored in ``row_order`` (packed tile-row i holds original tile-row ``row_order[i]``); inside a
packed tile-row the 2:4 tiles come first, then the dense tiles, each kind in K order.  Each kind's
full-width tiles of a tile-row lie back to back in one region, so a kernel walks every packed
tile-row as one affine stream per kind: tile j starts at ``region + j * rows * (values per tile
row)``; the ragged last tile-column (if any) has its own small region.

Buffers (the kernels' arguments, ``KERNEL_BUFFERS``):

* ``rows``  int32 [nN, ROW_FIELDS]: per packed tile-row its original tile-row, its number of
  weight rows, its 2:4 and dense tile counts, ``edge`` (1: its last 2:4 tile is the ragged
  tile-column, 2: its last dense tile is) and the starts of its regions in units of ``ALIGN`` = 16
  bytes (every region 16-byte aligned: vector loads, ``cp.async``);
* ``kidx``  int32 [nN, nK]: the K tile index of every slot of a packed tile-row (2:4 tiles then
  dense); a kernel loads its row of it once, at an address known from its program id;
* ``sparse_vals`` (dtype): per 2:4 tile [rows, width / 2]: the 2 kept values of every group of
  4 along K, lower position first;
* ``sparse_meta`` int32: per 2:4 tile [rows, ceil(width / 32)] words; group g of a row is nibble
  g % 8 of word g // 8 and holds its pattern id p (``PATTERNS[p]`` = the two kept positions),
  so a kernel turns a nibble into a byte-permute selector with one table lookup;
* ``dense_vals`` (dtype): per dense tile [rows, width], row-major.

Within each buffer the full tiles (tn x tk) of the full-height tile-rows come first, in packed
order (one [S, tn, .] block when a tile is a multiple of 16 bytes), then the short tile-row's
tiles, then the ragged-width tiles.  A 2:4 tile costs width/2 values + width/8 bytes per row:
56.25 % of its dense bytes in 16 bit.  ``pack(..., out=packed)`` writes into the buffers of an
earlier pack of the same tile map (a captured CUDA graph keeps reading the same memory);
``unpack`` on a GPU neither synchronises with the host nor copies from it (the index data it needs
is kept on the device and the host at pack time), so it may run inside a CUDA-graph capture.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from .dtypes import SAME_SIZE_INT
from .packformat import ALIGN, KERNEL_BUFFERS, PATTERNS, ROW, ROW_FIELDS  # noqa: F401 (re-exported)
from .packlayout import Layout, starts
from .types import TileMask, grid_of

# keep pattern (bit j = weight j of the group kept) -> pattern id
_ID_OF_KEEP = np.full(16, 255, dtype=np.uint8)
for _p, (_i0, _i1) in enumerate(PATTERNS):
    _ID_OF_KEEP[(1 << _i0) | (1 << _i1)] = _p
_I0 = np.array([a for a, _ in PATTERNS] + [0, 0], dtype=np.int64)
_I1 = np.array([b for _, b in PATTERNS] + [1, 1], dtype=np.int64)


@dataclass(eq=False)
class PackedWeight:
    shape: tuple[int, int]
    tile: tuple[int, int]
    dtype: torch.dtype
    rows: torch.Tensor          # int32 [nN, ROW_FIELDS]
    kidx: torch.Tensor          # int32 [nN, nK]
    sparse_vals: torch.Tensor   # dtype, flat
    sparse_meta: torch.Tensor   # int32, flat
    dense_vals: torch.Tensor    # dtype, flat
    # host copies of rows / kidx and the device index unpack uses (filled by pack; else on demand)
    aux: dict = field(default_factory=dict, repr=False)

    @property
    def grid(self) -> tuple[int, int]:
        return grid_of(self.shape, self.tile)

    @property
    def device(self) -> torch.device:
        return self.dense_vals.device

    @property
    def row_order(self) -> torch.Tensor:
        """int32 [nN]: the original tile-row of every packed tile-row."""
        return self.rows[:, ROW["orig"]]

    def host(self) -> tuple[np.ndarray, np.ndarray]:
        """(rows, kidx) as numpy arrays, without a device sync when ``pack`` made this weight."""
        if "rows" not in self.aux:
            self.aux["rows"], self.aux["kidx"] = self.rows.cpu().numpy(), self.kidx.cpu().numpy()
        return self.aux["rows"], self.aux["kidx"]

    @property
    def num_sparse(self) -> int:
        return int(self.host()[0][:, ROW["n_s"]].sum())

    @property
    def num_dense(self) -> int:
        return int(self.host()[0][:, ROW["n_d"]].sum())

    def buffers(self) -> dict[str, torch.Tensor]:
        """The tensors, in kernel argument order (``KERNEL_BUFFERS``)."""
        return {k: getattr(self, k) for k in KERNEL_BUFFERS}

    def nbytes(self) -> int:
        """Bytes of the packed form (values, metadata and index arrays)."""
        return sum(t.numel() * t.element_size() for t in self.buffers().values())

    def dense_nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * torch.empty((), dtype=self.dtype).element_size()

    def to(self, device) -> "PackedWeight":
        kw = {k: v.to(device) for k, v in self.buffers().items()}
        return PackedWeight(self.shape, self.tile, self.dtype, **kw,
                            aux={k: v for k, v in self.aux.items() if k in ("rows", "kidx")})


def balanced_row_order(tile_kind: torch.Tensor) -> torch.Tensor:
    """Tile-rows with the most dense tiles (the most work) first, ties in original order."""
    dense = (tile_kind == 0).sum(1)
    return torch.sort(-dense, stable=True).indices.to(torch.int32)


def packed_nbytes(tile_mask, dtype) -> int:
    """Bytes of ``pack(weight, tile_mask)`` (values, metadata, index arrays) without packing
    (exact for any row order)."""
    elt = torch.empty((), dtype=dtype).element_size()
    return Layout(tile_mask.tile_kind, tile_mask.shape, tile_mask.tile, None, elt).nbytes()


# ---- packing --------------------------------------------------------------------------------
_CHUNK_GROUPS = 1 << 19          # groups of 4 per chunk: bounds the int64 index temporaries (~8 MiB)


def pack(weight: torch.Tensor, tile_mask: TileMask, row_order: Optional[torch.Tensor] = None,
         out: Optional[PackedWeight] = None) -> PackedWeight:
    """Pack ``weight`` (out, in) under ``tile_mask`` (pruned weights are dropped).

    ``out``: an earlier ``pack`` of the same tile map, dtype, device and row order; its buffers
    are overwritten in place and it is returned (``ValueError`` when the layout differs), so
    memory a captured CUDA graph reads is never freed.  The values are gathered on the CPU with
    numpy (fancy-indexed tile gathers, ``take_along_axis`` of the kept values), on other devices
    with torch ops.
    """
    if tuple(weight.shape) != tile_mask.shape:
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match its mask {tile_mask.shape}")
    w = weight.detach()
    lay = Layout(tile_mask.tile_kind, tile_mask.shape, tile_mask.tile, row_order, w.element_size())
    if out is not None and (out.dtype != w.dtype or out.device != w.device or not lay.matches(out)):
        raise ValueError("pack(out=...): the packed weight has another tile map, row order, dtype or device; "
                         "repacking in place needs the same layout")
    sv, sm, dv = _pack_values(w, tile_mask, lay)
    if out is not None:
        out.sparse_vals.copy_(sv)
        out.sparse_meta.copy_(sm)
        out.dense_vals.copy_(dv)
        return out
    dev = w.device
    p = PackedWeight(shape=tuple(w.shape), tile=tuple(tile_mask.tile), dtype=w.dtype,
                     rows=torch.from_numpy(lay.table).to(dev), kidx=torch.from_numpy(lay.kidx).to(dev),
                     sparse_vals=sv, sparse_meta=sm, dense_vals=dv)
    p.aux.update(rows=lay.table, kidx=lay.kidx, layout=lay)
    p.aux["dst"] = {kind: torch.from_numpy(_full_dst(lay, kind)).to(dev) for kind in (0, 1)}
    return p


def _full_dst(lay: Layout, kind: int) -> np.ndarray:
    """Flat tile index (original tile-row x nK + tile-column) of the full tiles of area A, in order."""
    r, c, rw, ww = lay.tiles(kind)
    full = (rw == lay.tile[0]) & (ww == lay.tile[1])
    return (lay.order[r[full]] * lay.grid[1] + c[full]).astype(np.int64)


def _padded(x: torch.Tensor, tile, grid) -> torch.Tensor:
    """``x`` padded with zeros to the full tile grid (no copy when it already fits)."""
    ph, pw = grid[0] * tile[0] - x.shape[0], grid[1] * tile[1] - x.shape[1]
    if not ph and not pw:
        return x.contiguous()
    if x.dtype == torch.bool:
        return torch.nn.functional.pad(x.view(torch.uint8), (0, pw, 0, ph)).view(torch.bool)
    return torch.nn.functional.pad(x, (0, pw, 0, ph))


def _place(blocks: torch.Tensor, kind: int, kd, lay: Layout, size, crop, like) -> torch.Tensor:
    """One flat buffer from per-tile blocks [S, tn, .] in ``lay.tiles`` order: area A (the full
    tiles) in one copy when its tiles are 16-byte multiples, every other tile cropped to its true
    size at its own start; zero padding between regions."""
    tn, tk = lay.tile
    r, c, rw, ww = lay.tiles(kind)
    out = like.new_zeros(kd.total)
    if not len(r):
        return out
    full = (rw == tn) & (ww == tk)
    rest = np.arange(len(r))
    if kd.uniform and full.any():
        sel = np.flatnonzero(full)
        out[: len(sel) * blocks[0].numel()] = blocks[torch.as_tensor(sel, device=blocks.device)].reshape(-1)
        rest = np.flatnonzero(~full)
    if len(rest):
        at = starts(lay, kind, kd, size)
        for t in rest:
            b = crop(blocks[t], int(rw[t]), int(ww[t])).reshape(-1)
            out[int(at[t]): int(at[t]) + b.numel()] = b
    return out


def _pack_values(w: torch.Tensor, tile_mask: TileMask, lay: Layout):
    (tn, tk), (nN, nK) = lay.tile, lay.grid
    dev = w.device
    numpy_path = dev.type == "cpu" and w.element_size() in SAME_SIZE_INT
    tiles = _padded(w, lay.tile, lay.grid).view(nN, tn, nK, tk)
    t4 = tiles.view(SAME_SIZE_INT[w.element_size()]).numpy() if numpy_path else tiles.permute(0, 2, 1, 3)

    def gather(orig, c):                     # tiles [s, tn, tk] at (original tile-row, tile-column)
        if numpy_path:
            return torch.from_numpy(t4[orig, :, c, :]).view(w.dtype)
        return t4[torch.as_tensor(orig, device=dev), torch.as_tensor(c, device=dev)]

    # ---- dense tiles: blocks [rows, width] ----
    r, c, rw, ww = lay.tiles(0)
    dblocks = gather(lay.order[r], c) if len(r) else w.new_zeros(0, tn, tk)
    dv = _place(dblocks, 0, lay.dv, lay, lambda h, wd: h * wd, lambda b, h, wd: b[:h, :wd], w)
    # ---- 2:4 tiles: kept values [rows, width/2] and meta words [rows, ceil(width/32)] ----
    r, c, rw, ww = lay.tiles(1)
    S, nw = len(r), -(-tk // 32)
    vals = w.new_empty(S, tn, tk // 2)
    words = torch.empty(S, tn, nw, dtype=torch.int32)
    if S:
        orig = lay.order[r]
        mask = _padded(tile_mask.mask, lay.tile, lay.grid).view(nN, tn, nK, tk).numpy()
        step = max(1, _CHUNK_GROUPS // (tn * tk // 4))
        for a in range(0, S, step):
            b = min(S, a + step)
            ids = _pattern_ids(mask[orig[a:b], :, c[a:b], :], ww[a:b], rw[a:b])       # [s, tn, tk/4]
            pos = np.stack([_I0[ids], _I1[ids]], -1)
            t = gather(orig[a:b], c[a:b]).reshape(b - a, tn, tk // 4, 4)
            if numpy_path:
                kept = np.take_along_axis(t.view(SAME_SIZE_INT[w.element_size()]).numpy(), pos, axis=-1)
                vals[a:b] = torch.from_numpy(kept.reshape(b - a, tn, tk // 2)).view(w.dtype)
            else:
                vals[a:b] = torch.gather(t, -1, torch.from_numpy(pos).to(dev)).reshape(b - a, tn, tk // 2)
            words[a:b] = torch.from_numpy(_meta_words(ids, tk))
    words = words.to(dev)
    sv = _place(vals, 1, lay.sv, lay, lambda h, wd: h * (wd // 2), lambda b, h, wd: b[:h, : wd // 2], w)
    sm = _place(words, 1, lay.sm, lay, lambda h, wd: h * -(-wd // 32), lambda b, h, wd: b[:h, : -(-wd // 32)],
                words)
    return sv, sm, dv


def _pattern_ids(m4: np.ndarray, width: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Pattern id of every group of 2:4 tiles (bool [S, tn, tk] -> uint8 [S, tn, tk/4]); groups
    outside a tile's true size (padding) get pattern 0."""
    S, tn, tk = m4.shape
    v = np.ascontiguousarray(m4).view(np.uint8).reshape(S, tn, tk // 4, 4).astype(np.uint8)
    keep = v[..., 0] | (v[..., 1] << 1) | (v[..., 2] << 2) | (v[..., 3] << 3)
    ids = _ID_OF_KEEP[keep]
    g = np.arange(tk // 4)
    outside = (g[None, None, :] * 4 >= width[:, None, None]) | (np.arange(tn)[None, :, None] >= rows[:, None, None])
    ids = np.where(outside, 0, ids)
    if (ids == 255).any():
        raise ValueError("a 2:4 tile has a group that does not keep exactly 2 of 4 weights")
    return ids.astype(np.uint8)


def _meta_words(ids: np.ndarray, tk: int) -> np.ndarray:
    """uint8 ids [S, tn, tk/4] -> int32 [S, tn, ceil(tk/32)]: two nibbles per byte, four bytes per
    little-endian int32, so group g sits at bits 4 (g % 8) of word g // 8."""
    n_words = -(-tk // 32)
    if n_words * 8 != tk // 4:
        ids = np.pad(ids, ((0, 0), (0, 0), (0, n_words * 8 - tk // 4)))
    byte = ids[..., 0::2] | (ids[..., 1::2] << 4)
    return np.ascontiguousarray(byte).view("<i4").astype(np.int32)


# ---- unpacking ------------------------------------------------------------------------------
_I0_BITS = sum(a << (2 * p) for p, (a, _) in enumerate(PATTERNS))
_I1_BITS = sum(b << (2 * p) for p, (_, b) in enumerate(PATTERNS))


def decode_groups(vals: torch.Tensor, words: torch.Tensor, width: int) -> torch.Tensor:
    """Expand 2:4 rows: kept values [..., width/2] + meta words [..., ceil(width/32)] -> [..., width]
    (device arithmetic only: no table is copied from the host)."""
    dev = vals.device
    g = torch.arange(width // 4, device=dev)
    ids = (words.to(torch.int64)[..., g // 8] >> (4 * (g % 8))) & 0xF
    pos = torch.stack([(_I0_BITS >> (2 * ids)) & 3, (_I1_BITS >> (2 * ids)) & 3], -1)
    out = torch.zeros(vals.shape[:-1] + (width // 4, 4), dtype=vals.dtype, device=dev)
    out.scatter_(-1, pos, vals.reshape(vals.shape[:-1] + (width // 4, 2)))
    return out.reshape(vals.shape[:-1] + (width,))


def _layout_of(p: PackedWeight) -> Layout:
    lay = p.aux.get("layout")
    if lay is None:
        rows, _ = p.host()
        lay = p.aux["layout"] = Layout(unpack_tile_kind(p), p.shape, p.tile, rows[:, ROW["orig"]].astype(np.int64),
                                       p.sparse_vals.element_size())
    return lay


def unpack(p: PackedWeight) -> torch.Tensor:
    """The masked dense weight (N, K) back from the packed form (exact).  The full tiles move in one
    indexed copy per kind (an index kept on the device since ``pack``), the short tile-row and the
    ragged tile-column tile by tile at offsets known on the host: no host sync, no host-to-device
    copy, so it may run inside a CUDA-graph capture."""
    (tn, tk), (nN, nK) = p.tile, p.grid
    lay = _layout_of(p)
    dev = p.device
    out = torch.zeros(nN * tn, nK * tk, dtype=p.dtype, device=dev)
    out4 = out.view(nN, tn, nK, tk)
    dst = p.aux.get("dst")
    if dst is None or dst[0].device != dev:
        dst = p.aux["dst"] = {kind: torch.from_numpy(_full_dst(lay, kind)).to(dev) for kind in (0, 1)}
    nw = -(-tk // 32)
    for kind in (0, 1):
        r, c, rw, ww = lay.tiles(kind)
        full = (rw == tn) & (ww == tk)
        rest = np.flatnonzero(~full)
        n_full = int(full.sum())
        one_block = lay.dv.uniform if kind == 0 else (lay.sv.uniform and lay.sm.uniform)
        if n_full and one_block:                        # area A: one [S, tn, .] block, one scatter
            if kind == 0:
                blocks = p.dense_vals[: n_full * tn * tk].view(n_full, tn, tk)
            else:
                blocks = decode_groups(p.sparse_vals[: n_full * tn * (tk // 2)].view(n_full, tn, tk // 2),
                                       p.sparse_meta[: n_full * tn * nw].view(n_full, tn, nw), tk)
            out4[dst[kind] // nK, :, dst[kind] % nK, :] = blocks
        elif n_full:
            rest = np.arange(len(r))
        if not len(rest):
            continue
        if kind == 0:
            st = starts(lay, 0, lay.dv, lambda h, w: h * w)
        else:
            st = starts(lay, 1, lay.sv, lambda h, w: h * (w // 2))
            sm = starts(lay, 1, lay.sm, lambda h, w: h * -(-w // 32))
        for t in rest:
            h, w, r0, c0 = int(rw[t]), int(ww[t]), int(lay.order[r[t]]) * tn, int(c[t]) * tk
            if kind == 0:
                block = p.dense_vals[int(st[t]): int(st[t]) + h * w].view(h, w)
            else:
                q = -(-w // 32)
                block = decode_groups(p.sparse_vals[int(st[t]): int(st[t]) + h * (w // 2)].view(h, w // 2),
                                      p.sparse_meta[int(sm[t]): int(sm[t]) + h * q].view(h, q), w)
            out[r0: r0 + h, c0: c0 + w] = block
    return out[: p.shape[0], : p.shape[1]]


def unpack_tile_kind(p: PackedWeight) -> torch.Tensor:
    """uint8 [nN, nK] tile map in original order."""
    rows, kidx = p.host()
    nN, nK = p.grid
    kind = np.zeros((nN, nK), np.uint8)
    for i in range(nN):
        kind[rows[i, ROW["orig"]], kidx[i, : rows[i, ROW["n_s"]]]] = 1
    return torch.from_numpy(kind)
