"""Finding the linear layers of a model and their weights in (out, in) orientation."""
from __future__ import annotations

import fnmatch
from typing import Iterable, Optional

import torch
from torch import nn


def is_linear(module: nn.Module) -> bool:
    """nn.Linear (and subclasses) or transformers' ``Conv1D`` (weight stored (in, out))."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def is_transposed(module: nn.Module) -> bool:
    """True when the module stores its weight as (in, out) (transformers' Conv1D)."""
    return type(module).__name__ == "Conv1D"


def oriented_weight(module: nn.Module) -> torch.Tensor:
    """The module's weight as (out, in); a view for (in, out) storage."""
    w = module.weight
    return w.t() if is_transposed(module) else w


def output_embedding_names(model: nn.Module) -> set[str]:
    """FQNs of the LM head (a transformers model's output embeddings), which plans leave out."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return set()
    return {name for name, m in model.named_modules() if m is head}


def select_linears(model: nn.Module, include: Optional[Iterable[str]] = None,
                   exclude: Optional[Iterable[str]] = None, lm_head: bool = False) -> dict[str, nn.Module]:
    """The linear layers a plan covers, by FQN, in model order.

    Default: every linear except the LM head.  ``include``/``exclude`` are fnmatch patterns on
    the FQN (``"model.layers.*.mlp.*"``); ``include`` keeps only matching ones.
    """
    heads = set() if lm_head else output_embedding_names(model)
    inc = list(include) if include else None
    exc = list(exclude) if exclude else []
    out: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if not is_linear(m) or name in heads:
            continue
        if inc is not None and not any(fnmatch.fnmatchcase(name, p) for p in inc):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in exc):
            continue
        out[name] = m
    return out


def fingerprint(model: nn.Module, names: Iterable[str]) -> dict[str, list[int]]:
    """Names and (out, in) shapes of the given linears: what a plan was made for."""
    mods = dict(model.named_modules())
    return {n: list(oriented_weight(mods[n]).shape) for n in names}


def param_owners(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) → FQNs of the modules holding it directly (several when tied)."""
    owners: dict[int, list[str]] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for p in mod.parameters(recurse=False):
            owners.setdefault(id(p), [])
            if mname not in owners[id(p)]:
                owners[id(p)].append(mname)
    return owners
