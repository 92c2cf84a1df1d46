"""``PackedWeight``: a masked weight in the kernels' format, ``pack`` / ``unpack`` and their sizes.

A weight (N, K) is cut into tiles (tn, tk) on a grid (nN, nK); ragged edge tiles are stored at
their true size (no padding), so a layer never packs larger than dense.  The tile-rows are
stored in ``row_order`` (packed tile-row i holds original tile-row ``row_order[i]``); inside a
packed tile-row the 2:4 tiles come first, then the dense tiles, each kind in K order, each kind's
tiles back to back in one region of its buffer (the ragged last tile-column, if any, is the last
of its kind).  So a kernel walks every packed tile-row as one affine stream per kind: tile j of
a kind starts at ``region + j * rows * (values per tile row)``.

Buffers (the kernels' arguments, ``KERNEL_BUFFERS``):

* ``rows``  int32 [nN, ROW_FIELDS]: per packed tile-row its original tile-row, its number of
  weight rows, its 2:4 and dense tile counts, ``edge`` (1: its last 2:4 tile is the ragged
  tile-column, 2: its last dense tile is) and the starts of its three regions in units of
  ``ALIGN`` = 16 bytes (so every region is 16-byte aligned: vector loads, ``cp.async``);
* ``kidx``  int32 [nN, nK]: the K tile index of every slot of a packed tile-row (2:4 tiles then
  dense); a kernel loads its row of it once, at an address known from its program id;
* ``sparse_vals`` (dtype): per 2:4 tile [rows, width / 2]: the 2 kept values of every group of
  4 along K, lower position first;
* ``sparse_meta`` int32: per 2:4 tile [rows, ceil(width / 32)] words; group g of a row is nibble
  g % 8 of word g // 8 and holds its pattern id p (``PATTERNS[p]`` = the two kept positions),
  so a kernel turns a nibble into a byte-permute selector with one table lookup;
* ``dense_vals`` (dtype): per dense tile [rows, width], row-major.

A 2:4 tile costs width/2 values + width/8 bytes per row: 56.25 % of its dense bytes in 16 bit.
``pack(..., out=packed)`` writes into the buffers of an earlier pack of the same tile map (a
captured CUDA graph keeps reading the same memory).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .dtypes import SAME_SIZE_INT
from .packformat import ALIGN, KERNEL_BUFFERS, PATTERNS, ROW, ROW_FIELDS  # noqa: F401 (re-exported)
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

    @property
    def num_sparse(self) -> int:
        return int(self.rows[:, ROW["n_s"]].sum())

    @property
    def num_dense(self) -> int:
        return int(self.rows[:, ROW["n_d"]].sum())

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
        return PackedWeight(self.shape, self.tile, self.dtype, **kw)


def balanced_row_order(tile_kind: torch.Tensor) -> torch.Tensor:
    """Tile-rows with the most dense tiles (the most work) first, ties in original order."""
    dense = (tile_kind == 0).sum(1)
    return torch.sort(-dense, stable=True).indices.to(torch.int32)


# ---- the layout: sizes and offsets from the tile map alone ------------------------------------
class Layout:
    """Where everything of a packed weight goes, from the tile map, row order and element size
    (no weights needed: ``packed_nbytes`` reads it)."""

    def __init__(self, tile_kind, shape, tile, row_order, elt: int):
        (n, k), (tn, tk) = shape, tile
        nN, nK = grid_of(shape, tile)
        kind = np.asarray(torch.as_tensor(tile_kind).to(torch.uint8).cpu().numpy(), dtype=np.int64)
        order = np.arange(nN) if row_order is None else np.asarray(torch.as_tensor(row_order).cpu(), np.int64)
        if order.shape != (nN,) or not np.array_equal(np.sort(order), np.arange(nN)):
            raise ValueError(f"row_order must be a permutation of range({nN})")
        self.shape, self.tile, self.grid, self.elt, self.order = (n, k), (tn, tk), (nN, nK), elt, order
        kp = kind[order]                                                     # [nN, nK] in packed order
        self.n_s = kp.sum(1)
        self.n_d = nK - self.n_s
        # slots: 2:4 tile-columns (K order), then dense ones
        self.kidx = np.argsort((kp == 0) * nK + np.arange(nK)[None, :], axis=1, kind="stable").astype(np.int32)
        self.rows_n = np.minimum(tn, n - order * tn)                         # weight rows per tile-row
        self.width = np.minimum(tk, k - np.arange(nK) * tk)                 # columns per tile-column
        ragged = self.width[-1] != tk
        edge = np.zeros(nN, np.int64)
        if ragged:
            edge = np.where(kp[:, -1] == 1, 1, 2)
        self.edge = edge
        # per packed row: elements of each region (2:4 values, meta words, dense values)
        w_s = (kp * self.width[None, :]).sum(1)                              # total 2:4 width of a row
        w_d = ((1 - kp) * self.width[None, :]).sum(1)
        words = -(-self.width // 32)
        m_s = (kp * words[None, :]).sum(1)
        self.sv_len = self.rows_n * w_s // 2
        self.sm_len = self.rows_n * m_s
        self.dv_len = self.rows_n * w_d
        ua, um = ALIGN // elt, ALIGN // 4                                    # region alignment, in elements
        self.sv_base, self.sv_total = _bases(self.sv_len, ua)
        self.sm_base, self.sm_total = _bases(self.sm_len, um)
        self.dv_base, self.dv_total = _bases(self.dv_len, ua)
        self.table = np.stack([order, self.rows_n, self.n_s, self.n_d, edge, self.sv_base // ua,
                               self.sm_base // um, self.dv_base // ua], axis=1).astype(np.int32)

    def nbytes(self) -> int:
        return (self.table.size + self.kidx.size + self.sm_total) * 4 + (self.sv_total + self.dv_total) * self.elt

    def matches(self, p: PackedWeight) -> bool:
        """Whether ``p`` was packed with this layout (same tile map, order, sizes)."""
        return (tuple(p.shape) == self.shape and tuple(p.tile) == self.tile
                and np.array_equal(p.rows.cpu().numpy(), self.table) and np.array_equal(p.kidx.cpu().numpy(), self.kidx)
                and p.sparse_vals.numel() == self.sv_total and p.dense_vals.numel() == self.dv_total
                and p.sparse_meta.numel() == self.sm_total)


def _bases(lengths: np.ndarray, unit: int):
    """Aligned region starts of consecutive regions of ``lengths`` elements, and the total."""
    padded = -(-lengths // unit) * unit
    starts = np.concatenate([[0], np.cumsum(padded)[:-1]]) if len(padded) else np.zeros(0, np.int64)
    return starts.astype(np.int64), int(padded.sum())


def packed_nbytes(tile_mask, dtype) -> int:
    """Bytes of ``pack(weight, tile_mask)`` (values, metadata, index arrays) without packing
    (exact; the row order does not change it)."""
    elt = torch.empty((), dtype=dtype).element_size()
    return Layout(tile_mask.tile_kind, tile_mask.shape, tile_mask.tile, None, elt).nbytes()


# ---- packing --------------------------------------------------------------------------------
def pack(weight: torch.Tensor, tile_mask: TileMask, row_order: Optional[torch.Tensor] = None,
         out: Optional[PackedWeight] = None) -> PackedWeight:
    """Pack ``weight`` (out, in) under ``tile_mask`` (pruned weights are dropped).

    ``out``: an earlier ``pack`` of the same tile map, dtype, device and row order; its buffers
    are overwritten in place and it is returned (``ValueError`` when the layout differs), so
    memory a captured CUDA graph reads is never freed.  The values are gathered on the CPU with
    numpy (fancy-indexed tile gathers, a flat ``take`` of the kept values), on other devices with
    torch ops; no device-to-host synchronisation either way.
    """
    if tuple(weight.shape) != tile_mask.shape:
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match its mask {tile_mask.shape}")
    w = weight.detach()
    lay = Layout(tile_mask.tile_kind, tile_mask.shape, tile_mask.tile, row_order, w.element_size())
    if out is not None and (not lay.matches(out) or out.dtype != w.dtype or out.device != w.device):
        raise ValueError("pack(out=...): the packed weight has another tile map, row order, dtype or device; "
                         "repacking in place needs the same layout")
    sv, sm, dv = _pack_values(w, tile_mask, lay)
    if out is not None:
        out.sparse_vals.copy_(sv)
        out.sparse_meta.copy_(sm)
        out.dense_vals.copy_(dv)
        return out
    dev = w.device
    return PackedWeight(shape=tuple(w.shape), tile=tuple(tile_mask.tile), dtype=w.dtype,
                        rows=torch.from_numpy(lay.table).to(dev), kidx=torch.from_numpy(lay.kidx).to(dev),
                        sparse_vals=sv, sparse_meta=sm, dense_vals=dv)


def _tile_blocks(lay: Layout, kind_wanted: int):
    """(packed row, slot, tile-column, rows, width) of every tile of a kind, in buffer order."""
    nN, nK = lay.grid
    slot = np.arange(nK)[None, :]
    sel = (slot < lay.n_s[:, None]) if kind_wanted == 1 else (slot >= lay.n_s[:, None])
    r, s = np.nonzero(sel)
    c = lay.kidx[r, s].astype(np.int64)
    return r, c, lay.rows_n[r], lay.width[c]


def _padded(x: torch.Tensor, tile, grid) -> torch.Tensor:
    """``x`` padded with zeros to the full tile grid (no copy when it already fits)."""
    ph, pw = grid[0] * tile[0] - x.shape[0], grid[1] * tile[1] - x.shape[1]
    if not ph and not pw:
        return x.contiguous()
    if x.dtype == torch.bool:
        return torch.nn.functional.pad(x.view(torch.uint8), (0, pw, 0, ph)).view(torch.bool)
    return torch.nn.functional.pad(x, (0, pw, 0, ph))


def _assemble(regions, bases, total, like, lengths):
    """One flat buffer: every packed row's blocks (``_regions``) at its region start, zero padding
    between regions."""
    if not total:
        return like.new_zeros(0)
    parts, pos = [], 0
    for i, base in enumerate(bases):
        if lengths[i] == 0:
            continue
        if base > pos:
            parts.append(like.new_zeros(int(base - pos)))
        parts.extend(b.reshape(-1) for b in regions[i])
        pos = int(base + lengths[i])
    if total > pos:
        parts.append(like.new_zeros(int(total - pos)))
    return torch.cat(parts) if len(parts) > 1 else parts[0].clone()


_CHUNK_GROUPS = 1 << 19          # groups of 4 per chunk: bounds the int64 index temporaries (~8 MiB)


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

    # ---- dense tiles: blocks [rows, width] per packed row ----
    r, c, rw, ww = _tile_blocks(lay, 0)
    dblocks = gather(lay.order[r], c) if len(r) else w.new_zeros(0, tn, tk)
    dv = _assemble(_regions(dblocks, r, rw, ww, lay, lambda b, h, wd: b[:h, :wd]),
                   lay.dv_base, lay.dv_total, w, lay.dv_len)
    # ---- 2:4 tiles: kept values [rows, width/2] and meta words [rows, ceil(width/32)] ----
    r, c, rw, ww = _tile_blocks(lay, 1)
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
    sv = _assemble(_regions(vals, r, rw, ww, lay, lambda b, h, wd: b[:h, : wd // 2]),
                   lay.sv_base, lay.sv_total, w, lay.sv_len)
    sm = _assemble(_regions(words, r, rw, ww, lay, lambda b, h, wd: b[:h, : -(-wd // 32)]),
                   lay.sm_base, lay.sm_total, words, lay.sm_len)
    return sv, sm, dv


def _regions(blocks, r, rw, ww, lay: Layout, crop):
    """Per packed row, its blocks at their true size: a run of full-size tiles as one slice,
    the ragged ones (last tile-column, short tile-row) cropped one by one."""
    (tn, tk), out = lay.tile, [[] for _ in range(lay.grid[0])]
    full = (rw == tn) & (ww == tk)
    j = 0
    while j < len(r):
        e = j + 1
        if full[j]:
            while e < len(r) and r[e] == r[j] and full[e]:
                e += 1
            out[r[j]].append(blocks[j:e])
        else:
            out[r[j]].append(crop(blocks[j], int(rw[j]), int(ww[j])).contiguous())
        j = e
    return out


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
def decode_groups(vals: torch.Tensor, words: torch.Tensor, width: int) -> torch.Tensor:
    """Expand 2:4 rows: kept values [..., width/2] + meta words [..., ceil(width/32)] -> [..., width]."""
    dev = vals.device
    g = torch.arange(width // 4, device=dev)
    w64 = words.to(torch.int64) & 0xFFFFFFFF
    ids = (w64[..., g // 8] >> (4 * (g % 8))) & 0xF
    pos = torch.stack([torch.as_tensor(_I0, device=dev)[ids], torch.as_tensor(_I1, device=dev)[ids]], -1)
    out = torch.zeros(vals.shape[:-1] + (width // 4, 4), dtype=vals.dtype, device=dev)
    out.scatter_(-1, pos, vals.reshape(vals.shape[:-1] + (width // 4, 2)))
    return out.reshape(vals.shape[:-1] + (width,))


def _blocks(buf: torch.Tensor, start: np.ndarray, rw, cols, full_rows: int, full_cols: int):
    """[len(start), full_rows, full_cols] blocks of ``buf`` (tile i: ``rw[i]`` x ``cols[i]`` elements
    at ``start[i]``, zero-padded to the full tile)."""
    out = buf.new_zeros(len(start), full_rows, full_cols)
    full = (rw == full_rows) & (cols == full_cols)
    if full.any():
        sel = np.flatnonzero(full)
        step = max(1, _CHUNK_GROUPS * 4 // max(1, full_rows * full_cols))
        ar = torch.arange(full_rows * full_cols, device=buf.device)
        for a in range(0, len(sel), step):
            s = sel[a: a + step]
            idx = torch.as_tensor(start[s], device=buf.device)[:, None] + ar[None, :]
            out[torch.as_tensor(s, device=buf.device)] = buf[idx].view(len(s), full_rows, full_cols)
    for i in np.flatnonzero(~full):
        h, wd = int(rw[i]), int(cols[i])
        out[i, :h, :wd] = buf[int(start[i]): int(start[i]) + h * wd].view(h, wd)
    return out


def unpack(p: PackedWeight) -> torch.Tensor:
    """The masked dense weight (N, K) back from the packed form (exact)."""
    (tn, tk), (nN, nK) = p.tile, p.grid
    lay = Layout(unpack_tile_kind(p), p.shape, p.tile, p.row_order.long(), p.sparse_vals.element_size())
    full = torch.zeros(nN, nK, tn, tk, dtype=p.dtype, device=p.device)
    r, c, rw, ww = _tile_blocks(lay, 0)
    if len(r):
        start = _starts(lay, r, rw * ww, lay.dv_base)
        full[torch.as_tensor(lay.order[r], device=p.device), torch.as_tensor(c, device=p.device)] = \
            _blocks(p.dense_vals, start, rw, ww, tn, tk)
    r, c, rw, ww = _tile_blocks(lay, 1)
    if len(r):
        nw = -(-ww // 32)
        vals = _blocks(p.sparse_vals, _starts(lay, r, rw * ww // 2, lay.sv_base), rw, ww // 2, tn, tk // 2)
        words = _blocks(p.sparse_meta, _starts(lay, r, rw * nw, lay.sm_base), rw, nw, tn, -(-tk // 32))
        full[torch.as_tensor(lay.order[r], device=p.device), torch.as_tensor(c, device=p.device)] = \
            decode_groups(vals, words, tk)
    return full.permute(0, 2, 1, 3).reshape(nN * tn, nK * tk)[: p.shape[0], : p.shape[1]]


def _starts(lay: Layout, r: np.ndarray, sizes: np.ndarray, bases: np.ndarray) -> np.ndarray:
    """Start (elements) of every tile listed by (packed row ``r``, in buffer order) of ``sizes``."""
    sizes = np.asarray(sizes, dtype=np.int64)
    ends = np.cumsum(sizes)
    first = np.searchsorted(r, r, side="left")
    return bases[r] + (ends - sizes) - (ends[first] - sizes[first])


def unpack_tile_kind(p: PackedWeight) -> torch.Tensor:
    """uint8 [nN, nK] tile map in original order."""
    nN, nK = p.grid
    kind = torch.zeros(nN, nK, dtype=torch.uint8)
    table = p.rows.cpu().long()
    kidx = p.kidx.cpu().long()
    for i in range(nN):
        kind[int(table[i, ROW["orig"]]), kidx[i, : int(table[i, ROW["n_s"]])]] = 1
    return kind
