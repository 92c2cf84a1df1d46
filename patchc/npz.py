"""Plans from released ``.npz`` mask files (MaskLLM's ``mask_compressed.npz``, PATCH releases).

Such a file maps a parameter or module name to its keep-mask, usually ``np.packbits`` of the
flattened bool mask (MSB first), sometimes a plain bool/0-1 array; ``<name>_shape`` (or
``<name>.shape``) entries may give the shape and a ``metadata`` entry may hold JSON.  The reader
is tolerant: keys may end in ``.weight``/``.mask``/``.weight_mask`` or be module FQNs, carry a
``module.`` prefix, or lack/add a leading ``model.``.  Masks are in the parameter's storage
orientation (transformers' Conv1D stores (in, out); its mask is transposed to (out, in)).

Tile kinds are inferred as in :func:`patchc.plan.mask_from_zeros`: a tile is 2:4 iff every group
of 4 along K keeps at most 2 (a group keeping fewer is topped up to 2); any other tile becomes
dense and keeps all its weights.  Weights restored that way are counted, logged and stored in
``plan.meta["restored_weights"]``.
"""
from __future__ import annotations

import json
import logging
import os

import numpy as np
import torch
from torch import nn

from .modules import fingerprint, is_linear, is_transposed, oriented_weight
from .plan import MaskPlan, MaskPlanError, mask_from_zeros
from .types import _check_tile

log = logging.getLogger("patchc")

_META_KEYS = ("metadata", "__metadata__", "meta", "_metadata")
_SUFFIXES = (".weight_mask", ".weight.mask", ".mask", ".weight", "_mask")


def _strip(key: str) -> str:
    for suf in _SUFFIXES:
        if key.endswith(suf):
            return key[: -len(suf)]
    return key


def _match(key: str, linears: dict[str, nn.Module]):
    """The module FQN a file key refers to, or None."""
    base = _strip(key)
    cands = [base, base.removeprefix("module."), "model." + base, base.removeprefix("model.")]
    for c in cands:
        if c in linears:
            return c
    tail = [n for n in linears if n.endswith("." + base) or base.endswith("." + n)]
    return tail[0] if len(tail) == 1 else None


def _metadata(arr) -> dict:
    try:
        raw = arr.tobytes().decode() if arr.dtype == np.uint8 else str(arr.item() if arr.ndim == 0 else arr[0])
        return json.loads(raw)
    except Exception:  # noqa: BLE001 - metadata is optional; a bad one is reported, not fatal
        log.warning("patchc: ignoring an unreadable metadata entry in the npz file")
        return {}


def _decode(path: str, key: str, arr: np.ndarray, shape: tuple) -> torch.Tensor:
    """bool tensor of ``shape`` from a packed or plain array; errors name the file and key."""
    numel = int(np.prod(shape))
    flat = arr.reshape(-1)
    if arr.dtype == np.uint8 and flat.size == (numel + 7) // 8 and flat.size != numel:
        bits = np.unpackbits(flat)[:numel]
    elif flat.size == numel:
        bits = flat != 0
    else:
        raise MaskPlanError(f"{path}: entry {key!r} has {flat.size} values ({arr.dtype}); a {shape} mask needs "
                            f"{numel} (plain) or {(numel + 7) // 8} bytes (np.packbits)")
    return torch.from_numpy(np.ascontiguousarray(bits.astype(bool))).view(*shape)


def plan_from_npz(path: str | os.PathLike, model: nn.Module, tile=(128, 128)) -> MaskPlan:
    """Turn a released ``.npz`` mask file into a :class:`MaskPlan` for ``model`` (see module doc).

    Linears the file does not mention are left out of the plan (they stay dense); file entries
    that match no linear are listed in a warning; a file matching none raises ``MaskPlanError``.
    """
    path = os.fspath(path)
    tile = _check_tile(tile)
    if not os.path.isfile(path):
        raise MaskPlanError(f"{path}: no such mask file")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04":                      # an .npz is a zip archive of .npy arrays
        raise MaskPlanError(f"{path}: not a .npz file (starts with {head!r}; a .npz mask file is the zip "
                            "archive numpy.savez writes)")
    try:
        npz = np.load(path, allow_pickle=False)     # never unpickle a downloaded file
        entries = {k: npz[k] for k in npz.files}
    except Exception as exc:  # noqa: BLE001 - numpy raises several types for a bad file
        raise MaskPlanError(f"{path}: not a readable .npz mask file ({exc})") from exc
    meta = {}
    for k in _META_KEYS:
        if k in entries:
            meta = _metadata(entries.pop(k))
    shapes = {}
    for k in list(entries):
        for suf in ("_shape", ".shape"):
            if k.endswith(suf):
                shapes[k[: -len(suf)]] = tuple(int(x) for x in entries.pop(k).reshape(-1))
    linears = {n: m for n, m in model.named_modules() if is_linear(m)}
    masks, unmatched, restored = {}, [], 0
    for key, arr in entries.items():
        name = _match(key, linears)
        if name is None:
            unmatched.append(key)
            continue
        mod = linears[name]
        store, oriented = tuple(mod.weight.shape), tuple(oriented_weight(mod).shape)
        shape = shapes.get(key) or shapes.get(_strip(key)) or (arr.shape if arr.ndim == 2 else store)
        if shape not in (store, oriented):
            raise MaskPlanError(f"{path}: entry {key!r} has shape {shape} but {name}.weight is {store}")
        keep = _decode(path, key, arr, shape)
        if is_transposed(mod) and shape == store:   # a Conv1D's mask in its storage (in, out) layout
            keep = keep.t()
        if tile[0] > keep.shape[0] or tile[1] > keep.shape[1]:
            raise MaskPlanError(f"{name}: tile {tile} is larger than the weight {tuple(keep.shape)} (out, in)")
        tm = mask_from_zeros(keep.to(torch.uint8), tile)   # keep-mask as "non-zeros"
        n_back = int((tm.mask & ~keep).sum())
        if n_back:
            log.warning("patchc: %s: %d weights the file prunes are kept (tiles that are not 2:4 become dense; "
                        "2:4 groups keeping fewer than 2 are topped up)", name, n_back)
        restored += n_back
        masks[name] = tm
    if unmatched:
        log.warning("patchc: %s: %d entries match no linear of the model: %s", path, len(unmatched), unmatched[:5])
    if not masks:
        raise MaskPlanError(f"{path}: no entry matches a linear layer of the model (keys: {sorted(entries)[:5]})")
    return MaskPlan(masks, {"tile": list(tile), "method": "imported-npz", "source": os.path.basename(path),
                            "npz_metadata": meta, "restored_weights": restored,
                            "fingerprint": fingerprint(model, masks)})
