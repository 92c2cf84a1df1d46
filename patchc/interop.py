"""Checkpoints saved by llmcompressor / compressed-tensors in a sparse compressed format.

Such a checkpoint directory has ``config.json`` with ``quantization_config.sparsity_config``
(``{"format": "sparse-24-bitmask" | "sparse-bitmask", "targets", "ignore", "global_sparsity",
"sparsity_structure"}``) and safetensors files in which every compressed weight ``<module>.weight``
is replaced by

- ``<module>.shape``: the dense (out, in) shape, an int tensor;
- ``<module>.compressed``: the kept values in row-major order (``sparse-24-bitmask``: [out, in / 2],
  exactly 2 of every 4 along a row; ``sparse-bitmask``: 1-D, the non-zeros);
- ``<module>.bitmask``: uint8 [out, ceil(in / 8)], the kept positions of each row packed 8 per
  byte, least significant bit first (``np.packbits(..., axis=-1, bitorder="little")``);
- ``<module>.row_offsets`` (``sparse-bitmask`` only): where each row starts in ``compressed``.

:func:`load_compressed_tensors` decompresses to a dense model (zeros where pruned) without the
``compressed-tensors`` package; :func:`plan_from_compressed_tensors` also infers the plan from the
weights (``patchc.infer_plan`` on the compressed linears: a tile whose every group of 4 keeps at
most 2 is 2:4), so ``patchc.compile(model, plan)`` runs it.  Quantized checkpoints are refused.
"""
from __future__ import annotations

import glob
import json
import logging
import os

import numpy as np
import torch

log = logging.getLogger("patchc")

FORMATS = ("sparse-24-bitmask", "sparse-bitmask")


def _config(path: str) -> dict:
    try:
        with open(os.path.join(path, "config.json")) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}


def sparsity_config(path) -> dict:
    """The checkpoint's ``sparsity_config`` (``{}`` when it has none)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return {}
    qc = _config(path).get("quantization_config") or _config(path).get("compression_config") or {}
    return qc.get("sparsity_config") or {} if isinstance(qc, dict) else {}


def is_compressed_tensors(path) -> bool:
    """Whether ``path`` is a checkpoint directory saved with a compressed-tensors sparsity config."""
    return bool(sparsity_config(path).get("format"))


def _check(path: str) -> str:
    cfg = _config(path)
    qc = cfg.get("quantization_config") or cfg.get("compression_config") or {}
    fmt = (qc.get("sparsity_config") or {}).get("format")
    if fmt not in FORMATS:
        raise ValueError(f"{path}: compressed-tensors sparsity format {fmt!r} is not supported; patchc reads "
                         f"{', '.join(FORMATS)}")
    if qc.get("config_groups"):
        raise ValueError(f"{path}: the checkpoint is also quantized (quantization_config.config_groups); patchc reads "
                         "sparse compressed-tensors checkpoints with unquantized weights only")
    return fmt


def _unpack_rows(bitmask: torch.Tensor, shape) -> torch.Tensor:
    """bool [out, in] from a row-wise little-endian bitmask."""
    bits = np.unpackbits(bitmask.numpy().astype(np.uint8, copy=False), axis=-1, count=int(shape[1]),
                         bitorder="little")
    return torch.from_numpy(bits.astype(bool)).reshape(int(shape[0]), int(shape[1]))


def decompress(name: str, parts: dict, fmt: str) -> torch.Tensor:
    """The dense weight of one compressed module from its ``shape``/``compressed``/``bitmask``."""
    try:
        shape = [int(v) for v in parts["shape"].reshape(-1).tolist()]
        values, bitmask = parts["compressed"], parts["bitmask"]
    except KeyError as exc:
        raise ValueError(f"{name}: compressed weight lacks its {exc.args[0]!r} tensor") from None
    if len(shape) != 2 or bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (shape[0], (shape[1] + 7) // 8):
        raise ValueError(f"{name}: bitmask {tuple(bitmask.shape)} {bitmask.dtype} does not fit shape {shape} "
                         f"(expected uint8 [{shape[0] if shape else '?'}, ceil(in / 8)])")
    keep = _unpack_rows(bitmask, shape)
    if fmt == "sparse-24-bitmask" and tuple(values.shape) != (shape[0], shape[1] // 2):
        raise ValueError(f"{name}: sparse-24-bitmask values have shape {tuple(values.shape)}, expected "
                         f"{(shape[0], shape[1] // 2)} for a {tuple(shape)} weight")
    if int(keep.sum()) != values.numel():
        raise ValueError(f"{name}: the bitmask keeps {int(keep.sum())} weights but {values.numel()} values are stored")
    dense = torch.zeros(shape, dtype=values.dtype)
    dense[keep] = values.reshape(-1)
    return dense


def read_state_dict(path: str) -> tuple[dict, list[str], str]:
    """(dense state dict, names of the decompressed modules, format) of a checkpoint directory."""
    from safetensors import safe_open

    fmt = _check(path)
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{path}: no .safetensors files in the checkpoint")
    raw = {}
    for f in files:
        with safe_open(f, framework="pt") as st:
            for k in st.keys():
                raw[k] = st.get_tensor(k)
    groups: dict[str, dict] = {}
    state = {}
    for k, t in raw.items():
        base, _, leaf = k.rpartition(".")
        if leaf in ("compressed", "bitmask", "shape", "row_offsets") and f"{base}.bitmask" in raw:
            groups.setdefault(base, {})[leaf] = t
        else:
            state[k] = t
    from tqdm.auto import tqdm
    for base in tqdm(list(groups), desc="decompressing", leave=False, disable=len(groups) < 50):
        state[f"{base}.weight"] = decompress(base, groups[base], fmt)
    return state, sorted(groups), fmt


def load_compressed_tensors(path, dtype=torch.float32):
    """A dense ``AutoModelForCausalLM`` (eval mode) from a sparse compressed-tensors checkpoint."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    path = os.fspath(path)
    state, names, fmt = read_state_dict(path)
    config = AutoConfig.from_pretrained(path)
    for attr in ("quantization_config", "compression_config"):
        if hasattr(config, attr):
            delattr(config, attr)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    res = model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"{path}: the checkpoint lacks {len(missing)} weights of the model: {missing[:5]}")
    if res.unexpected_keys:
        log.warning("patchc: %s: %d tensors match no parameter of the model: %s", path, len(res.unexpected_keys),
                    res.unexpected_keys[:5])
    from .dtypes import parse_dtype
    model.to(parse_dtype(dtype) or torch.float32)
    log.info("patchc: %s: decompressed %d %s weights", path, len(names), fmt)
    model._patchc_compressed = (fmt, names)
    return model.eval()


def plan_from_compressed_tensors(path, tile=(128, 128), dtype=torch.float32):
    """(dense model, plan): the decompressed model and the plan of its compressed linears, tile
    kinds inferred from the zeros of the weights."""
    from .modules import is_linear
    from .plan import MaskPlan, infer_plan

    model = load_compressed_tensors(path, dtype)
    fmt, names = model._patchc_compressed
    mods = dict(model.named_modules())
    linears = [n for n in names if n in mods and is_linear(mods[n])]
    if not linears:
        raise ValueError(f"{os.fspath(path)}: no compressed weight belongs to a linear layer")
    plan = infer_plan(model, tile, include=linears)
    meta = {**plan.meta, "method": f"imported-{fmt}", "source": os.path.basename(os.path.abspath(os.fspath(path)))}
    plan = MaskPlan(dict(plan.items()), meta)
    n24 = sum(1 for m in plan.values() if m.num_sparse_tiles())
    log.info("patchc: %d of %d compressed linears have 2:4 tiles", n24, len(plan))
    return model, plan
