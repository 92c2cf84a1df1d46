"""Where a packed weight's tiles go (``patchc.packing`` describes the format): per packed tile-row
its record, per buffer the start of every region -- all from the tile map, the row order and the
element size, no weights (``packing.packed_nbytes`` reads it)."""
from __future__ import annotations

import numpy as np
import torch

from .packformat import ALIGN
from .types import grid_of


# ---- the layout: sizes and offsets from the tile map alone ------------------------------------
class _Kind:
    """Where one buffer's tiles go: per packed row the start of its full-width tiles' region and
    of its ragged-width tile (elements; -1: none), and the buffer's length."""

    def __init__(self, lay: "Layout", kind: int, size, unit: int):
        (tn, tk), (nN, _) = lay.tile, lay.grid
        n_full = np.where(kind == 1, lay.n_s - lay.edge_s, lay.n_d - lay.edge_d)
        has_edge = lay.edge_s if kind == 1 else lay.edge_d
        full_row = lay.rows_n == tn
        pad = lambda x: -(-x // unit) * unit  # noqa: E731
        region = pad(n_full * size(lay.rows_n, tk))
        self.start = np.zeros(nN, np.int64)
        self.edge = np.full(nN, -1, np.int64)
        pos = 0
        order = list(np.flatnonzero(full_row)) + list(np.flatnonzero(~full_row))    # area A, then B
        self.uniform = bool(size(tn, tk) % unit == 0)         # area A is one [S, tn, .] block
        self.full_tiles = int(n_full[full_row].sum())
        for i in order:
            self.start[i] = pos
            pos += int(region[i])
        for i in np.flatnonzero(has_edge):                    # area C: the ragged-width tiles
            self.edge[i] = pos
            pos += int(pad(size(lay.rows_n[i], lay.wr)))
        self.total = pos
        self.n_full, self.unit = n_full, unit


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
        self.kind = kind
        self.n_s = kp.sum(1)
        self.n_d = nK - self.n_s
        # slots: 2:4 tile-columns (K order), then dense ones
        self.kidx = np.argsort((kp == 0) * nK + np.arange(nK)[None, :], axis=1, kind="stable").astype(np.int32)
        self.rows_n = np.minimum(tn, n - order * tn)                         # weight rows per tile-row
        self.wr = k - (nK - 1) * tk                                          # width of the last tile-column
        ragged = self.wr != tk
        self.edge_s = (kp[:, -1] == 1) & ragged
        self.edge_d = (kp[:, -1] == 0) & ragged
        ua, um = ALIGN // elt, ALIGN // 4                                    # region alignment, in elements
        self.sv = _Kind(self, 1, lambda r, w: r * (w // 2), ua)
        self.sm = _Kind(self, 1, lambda r, w: r * -(-w // 32), um)
        self.dv = _Kind(self, 0, lambda r, w: r * w, ua)
        unit = lambda kd, x: np.where(x >= 0, x // kd.unit, 0)  # noqa: E731
        self.table = np.stack([order, self.rows_n, self.n_s, self.n_d, self.edge_s + 2 * self.edge_d,
                               self.sv.start // ua, self.sm.start // um, self.dv.start // ua,
                               unit(self.sv, self.sv.edge), unit(self.sm, self.sm.edge), unit(self.dv, self.dv.edge)],
                              axis=1).astype(np.int32)

    def nbytes(self) -> int:
        return (self.table.size + self.kidx.size + self.sm.total) * 4 + (self.sv.total + self.dv.total) * self.elt

    def matches(self, p) -> bool:
        """Whether ``p`` was packed with this layout (same tile map, order, sizes)."""
        rows, kidx = p.host()
        return (tuple(p.shape) == self.shape and tuple(p.tile) == self.tile and np.array_equal(rows, self.table)
                and np.array_equal(kidx, self.kidx) and p.sparse_vals.numel() == self.sv.total
                and p.dense_vals.numel() == self.dv.total and p.sparse_meta.numel() == self.sm.total)

    def tiles(self, kind: int):
        """Every tile of a kind in buffer order: (packed row, tile-column, rows, width, slot)."""
        nN, nK = self.grid
        slot = np.arange(nK)[None, :]
        sel = (slot < self.n_s[:, None]) if kind == 1 else (slot >= self.n_s[:, None])
        r, s = np.nonzero(sel)
        c = self.kidx[r, s].astype(np.int64)
        return r, c, self.rows_n[r], np.minimum(self.tile[1], self.shape[1] - c * self.tile[1])


def starts(lay: Layout, kind: int, kd: _Kind, size) -> np.ndarray:
    """Start (elements) of every tile of a kind in ``kd``'s buffer, in ``lay.tiles`` order."""
    r, c, rw, ww = lay.tiles(kind)
    fullw = ww == lay.tile[1]
    rank = np.zeros(len(r), np.int64)                   # index among its row's full-width tiles
    for i in np.unique(r):
        sel = np.flatnonzero((r == i) & fullw)
        rank[sel] = np.arange(len(sel))
    return np.where(fullw, kd.start[r] + rank * size(rw, lay.tile[1]), kd.edge[r])
