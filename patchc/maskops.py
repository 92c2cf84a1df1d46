"""Mask arithmetic shared by the runtime and the passes: W ⊙ M, "does W already hold W ⊙ M",
row concatenation of weights and of sibling masks.  A leaf: tensors and ``TileMask`` only."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .dtypes import NO_SIGN_BITS, SAME_SIZE_INT
from .types import TileMask, mask_fingerprint


def holds_masked(w: Tensor, mask: Tensor) -> bool:
    """True when ``w`` (out, in) is already zero (±0) wherever ``mask`` prunes.

    On CPU in numpy on the bits (sign cleared), by blocks of ~1 M weights with an early exit, so
    an unmasked weight is settled in its first block (~6 ms for a 4096x1536 fp32 weight, against
    ~130 ms for the boolean index ``w[~mask].any()``).  Elsewhere one reduction on the device."""
    if w.device.type != "cpu" or not w.is_floating_point() or w.element_size() not in NO_SIGN_BITS:
        return not bool(((w != 0) & ~mask.to(w.device)).any())
    int_t, bits = SAME_SIZE_INT[w.element_size()], NO_SIGN_BITS[w.element_size()]
    rows = max(1, (1 << 20) // max(1, w.shape[1]))
    for a in range(0, w.shape[0], rows):
        x = w[a:a + rows]
        xi = (x.contiguous() if x.dim() == 2 and x.stride(-1) != 1 else x).view(int_t).numpy()
        if np.any((xi & bits).astype(bool) & ~mask[a:a + rows].numpy()):
            return False
    return True


def where_mask(tile_mask: TileMask, transposed: bool, device) -> Tensor:
    """The bool mask in the stored weight's orientation, built for one use and not kept (a mask
    file's bits are unpacked for the call and dropped: keeping them costs a byte per weight)."""
    m = tile_mask.unpacked().to(device)
    return m.t() if transposed else m


def apply_mask(w: Tensor, tile_mask: TileMask, transposed: bool) -> Tensor:
    """``w ⊙ M`` as a new tensor in ``w``'s orientation (``transposed``: ``w`` is stored (in, out))."""
    with torch.no_grad():
        return torch.where(where_mask(tile_mask, transposed, w.device), w, 0)


def cat_rows(ts) -> Tensor:
    """``torch.cat(ts, 0)``; CPU tensors go through numpy, which was 8-80x faster on a 2-core VM
    (2 x 786 KB uint8: 13.5 ms vs 0.16 ms; 2 x 4096x1536 bf16: 17 ms vs 2.2 ms), the difference
    being how fresh memory is obtained."""
    if any(t.device.type != "cpu" or t.element_size() not in SAME_SIZE_INT or t.is_complex()
           or t.dtype != ts[0].dtype for t in ts):
        return torch.cat(ts, 0)
    it = SAME_SIZE_INT[ts[0].element_size()]
    return torch.from_numpy(np.concatenate([t.detach().contiguous().view(it).numpy() for t in ts], 0)).view(ts[0].dtype)


def concat_masks(masks) -> TileMask:
    """The row-concatenation of TileMasks of one tile, each N a multiple of the tile height (so no
    tile-row straddles two of them)."""
    tile = masks[0].tile
    bad = [m.shape for m in masks if m.tile != tile or m.shape[0] % tile[0] or m.shape[1] != masks[0].shape[1]]
    if bad:
        raise ValueError(f"cannot concatenate masks {bad} with tile {tile}")
    kind = cat_rows([m.tile_kind for m in masks])
    if not all(m.shape[0] * m.shape[1] % 8 == 0 for m in masks):
        return TileMask(tile, kind, cat_rows([m.mask for m in masks]))
    # whole bytes: concatenate the bits; the statistics follow from the members' (valid members
    # make a valid concatenation)
    bits = cat_rows([m.bits[: m.shape[0] * m.shape[1] // 8] for m in masks])
    out = TileMask(tile, kind, bits=bits, shape=(sum(m.shape[0] for m in masks), masks[0].shape[1]),
                   validate=False)             # checked below from the members' validity
    out._cache.update(fp=mask_fingerprint(out.tile, out.shape, kind, bits.numpy()),
                      pruned=sum(m.pruned() for m in masks))
    if all(m._cache.get("valid") for m in masks):
        out._cache["valid"] = True
    return out
