"""Updated weights beside a mask plan: methods that change the kept weights (SparseGPT, weight
reconstruction after learning) write them as a safetensors file of the changed linears
(``<fqn>.weight`` tensors in the module's own layout and dtype, no pickle), and
``patchc.compile(model, plan, weights=FILE)`` / ``torch.compile(..., backend="patch",
options={"plan": ..., "weights": FILE})`` / ``patchc demo --weights FILE`` load them into the
model's parameters before anything is compiled or packed.  The runtime never sees the file: it
computes with the model's (now updated) parameters exactly as with any other weights.

Every tensor is checked against the model before any parameter changes (a bad file changes
nothing): the module exists and is a linear, the shape and dtype equal its weight's, the values
are finite.  Errors name the file and the layer.
"""
from __future__ import annotations

import json
import os
from typing import Mapping, Optional, Union

import torch
from torch import nn

from .files import atomic_path
from .modules import is_linear

FORMAT = 1
_META_KEY = "patchc_weights"


class WeightsFileError(ValueError):
    """A weights file that cannot be read or does not fit the model."""


def save_weights(path: Union[str, os.PathLike], weights: Mapping[str, torch.Tensor],
                 meta: Optional[dict] = None) -> str:
    """Write ``{fqn: weight}`` (the linears' updated weights, module layout) to ``path`` as
    safetensors (``<fqn>.weight`` keys; atomic write).  ``meta``: JSON-serialisable facts kept in
    the header (the method, the plan file it goes with)."""
    from safetensors.torch import save_file

    if not weights:
        raise WeightsFileError(f"{path}: no weights to save")
    tensors = {}
    for name, w in weights.items():
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            raise WeightsFileError(f"{path}: {name}: expected a floating-point tensor, got "
                                   f"{getattr(w, 'dtype', type(w).__name__)}")
        tensors[f"{name}.weight"] = w.detach().to("cpu").contiguous()
    header = {"format": FORMAT, "layers": len(tensors), **(meta or {})}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={_META_KEY: json.dumps(header)})
    return os.fspath(path)


def read_weights(path: Union[str, os.PathLike]) -> tuple[dict[str, torch.Tensor], dict]:
    """``({fqn: tensor}, header)`` of a file written by :func:`save_weights` (no pickle)."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsFileError(f"{path}: no such weights file")
    try:
        with safe_open(path, framework="pt") as f:
            header = (f.metadata() or {}).get(_META_KEY)
            if header is None:
                raise WeightsFileError(f"{path}: not a patchc weights file (no '{_META_KEY}' metadata); "
                                       "write it with patchc.weights.save_weights")
            out = {}
            for key in f.keys():
                if not key.endswith(".weight"):
                    raise WeightsFileError(f"{path}: tensor {key!r} is not a '<module>.weight' entry")
                out[key[: -len(".weight")]] = f.get_tensor(key)
    except WeightsFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise WeightsFileError(f"{path}: not a readable safetensors weights file ({exc})") from exc
    try:
        meta = json.loads(header)
    except json.JSONDecodeError as exc:
        raise WeightsFileError(f"{path}: its '{_META_KEY}' metadata is not JSON ({exc})") from None
    if meta.get("format") != FORMAT:
        raise WeightsFileError(f"{path}: weights file format {meta.get('format')!r}; this patchc reads {FORMAT}")
    return out, meta


def check_module(path: str, name: str, module: Optional[nn.Module]) -> None:
    """Raise ``WeightsFileError`` unless ``module`` is a linear the file may update."""
    if module is None:
        raise WeightsFileError(f"{path}: {name}: no such module in the model")
    if not is_linear(module):
        raise WeightsFileError(f"{path}: {name}: is a {type(module).__name__}, not a linear layer")


def check_tensor(path: str, name: str, ref: torch.Tensor, w: torch.Tensor) -> None:
    """Raise ``WeightsFileError`` unless ``w`` can replace the weight ``ref`` as it is."""
    if tuple(w.shape) != tuple(ref.shape):
        raise WeightsFileError(f"{path}: {name}: weight shape {tuple(w.shape)} but the model's is {tuple(ref.shape)}")
    if w.dtype != ref.dtype:
        raise WeightsFileError(f"{path}: {name}: weight dtype {str(w.dtype).replace('torch.', '')} but the model's "
                               f"is {str(ref.dtype).replace('torch.', '')}; load the model in that dtype or "
                               "convert the file")
    if not bool(torch.isfinite(w).all()):
        raise WeightsFileError(f"{path}: {name}: the weight has non-finite values")


def resolve(weights) -> tuple[str, dict[str, torch.Tensor]]:
    """(name for messages, ``{fqn: tensor}``) of a weights file path or a dict."""
    if isinstance(weights, (str, os.PathLike)):
        return os.fspath(weights), read_weights(weights)[0]
    if isinstance(weights, Mapping):
        return "weights", dict(weights)
    raise WeightsFileError(f"weights must be a path to a weights file or a dict of tensors, got {type(weights).__name__}")


@torch.no_grad()
def copy_into(path: str, targets: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Check every ``tensors[name]`` against ``targets[name]`` (a parameter), then copy; a tensor
    already equal is not copied (its parameter's version stays)."""
    for name, ref in targets.items():
        check_tensor(path, name, ref, tensors[name])
    changed = []
    for name, ref in targets.items():
        if not torch.equal(ref, tensors[name].to(ref.device)):
            ref.copy_(tensors[name])
            changed.append(name)
    return changed


def load_weights(model: nn.Module, weights: Union[str, os.PathLike, Mapping[str, torch.Tensor]]) -> list[str]:
    """Copy a weights file's (or a ``{fqn: tensor}`` dict's) tensors into ``model``'s linear
    weights, in place, after checking all of them against the model; returns the FQNs in the file."""
    path, tensors = resolve(weights)
    mods = dict(model.named_modules())
    for name in tensors:
        check_module(path, name, mods.get(name))
    copy_into(path, {n: mods[n].weight for n in tensors}, tensors)
    return list(tensors)


def weights_path_for(plan_path: Union[str, os.PathLike]) -> str:
    """The weights file written next to a plan file: ``masks.safetensors`` → ``masks.weights.safetensors``."""
    p = os.fspath(plan_path)
    stem = p[: -len(".safetensors")] if p.endswith(".safetensors") else p
    return stem + ".weights.safetensors"
