"""Reading a plan file written by ``MaskPlan.save``: safetensors (no pickle), either format version
(2: compact 2:4 codes, 1: a bit per weight), every mask validated; errors name the file, the layer
and what is wrong."""
from __future__ import annotations

import json
import os

import torch

from . import maskcodes
from .types import TileMask

FORMAT = "patchc.maskplan"
FORMAT_VERSION = 2                    # 2: compact 2:4 codes (patchc.maskcodes); 1: a bit per weight
READ_VERSIONS = (1, 2)


class MaskPlanError(ValueError):
    """A mask file or plan that cannot be used; the message names the file/layer at fault."""


def _header(path: str, meta: dict, error) -> dict:
    if "patchc" not in meta:
        raise error(f"{path}: safetensors header has no 'patchc' metadata; not a patchc mask file")
    try:
        header = json.loads(meta["patchc"])
    except json.JSONDecodeError as exc:
        raise error(f"{path}: 'patchc' header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise error(f"{path}: header format is {header.get('format') if isinstance(header, dict) else header!r}, "
                    f"expected {FORMAT!r}")
    if header.get("version") not in READ_VERSIONS:
        raise error(f"{path}: mask file version {header.get('version')!r}; this patchc reads versions "
                    f"{', '.join(map(str, READ_VERSIONS))} (a newer patchc wrote it?)")
    if not isinstance(header.get("entries"), dict):
        raise error(f"{path}: header has no 'entries' table")
    return header


def read_plan(cls, path):
    """``cls`` (``MaskPlan``) from the file at ``path``."""
    from safetensors import safe_open


    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MaskPlanError(f"{path}: no such mask file")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise MaskPlanError(f"{path}: not a readable safetensors mask file ({exc})") from exc
    header = _header(path, meta, MaskPlanError)
    payload = "codes" if header["version"] == 2 else "mask"
    masks = {}
    for name, e in header["entries"].items():
        where = f"{path}: {name}: "
        try:
            shape, tile = tuple(int(x) for x in e["shape"]), tuple(int(x) for x in e["tile"])
            kind, data = tensors[f"{name}.tile_kind"], tensors[f"{name}.{payload}"]
        except (KeyError, TypeError, ValueError) as exc:
            raise MaskPlanError(f"{path}: entry {name!r} is incomplete ({exc!r})") from exc
        if kind.dtype != torch.uint8 or data.dtype != torch.uint8:
            raise MaskPlanError(f"{where}tensors must be uint8")
        if len(shape) != 2 or min(shape) < 1:
            raise MaskPlanError(f"{where}shape {list(shape)} is not a 2-D (out, in) weight shape")
        try:
            if payload == "mask":
                if data.numel() != (shape[0] * shape[1] + 7) // 8:
                    raise ValueError(f"mask has {data.numel()} bytes, expected {(shape[0] * shape[1] + 7) // 8} "
                                     f"for shape {shape}")
                parts = {"bits": data, "shape": shape}
            else:
                parts = maskcodes.decode(tile, kind, shape, data)
            masks[name] = TileMask(tile, kind, **parts, name=f"{path}: {name}")
        except ValueError as exc:
            msg = str(exc)
            raise MaskPlanError(msg if msg.startswith(path) else where + msg) from None
    return cls(masks, header.get("meta") or {})
