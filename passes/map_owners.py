"""Pass 2: map each site to the FQN of the module that owns it.

Order of evidence: the node's ``nn_module_stack`` (so a tied weight maps to the module that
*uses* it, e.g. ``lm_head`` rather than ``embed_tokens``), then the parameter's dynamo source
(``meta["grapharg"]``), then identity against the model's parameters (``patchc.compile``).
"""
from __future__ import annotations

import re

from torch import nn

from .state import CompileState

_ROOT = re.compile(r"^[A-Za-z_]\w*(\[[^\]]*\])*")
_MOD = re.compile(r"\._modules\[['\"]([^'\"]+)['\"]\]")
_IDX = re.compile(r"\[(\d+)\]")
_PARAM = re.compile(r"\._parameters\[['\"]([^'\"]+)['\"]\]$")


def normalize_path(path: str) -> str:
    """``L['self'].model.layers[0]._modules['q_proj']`` → ``model.layers.0.q_proj``."""
    rest = _ROOT.sub("", path, count=1)
    rest = _MOD.sub(r".\1", rest)
    rest = _IDX.sub(r".\1", rest)
    return rest.lstrip(".")


def _from_stack(node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return normalize_path(path)


def _from_source(weight_node) -> str | None:
    ga = weight_node.meta.get("grapharg")
    src = getattr(ga, "source", None)
    name = src.name if isinstance(getattr(src, "name", None), str) else (src.name() if src is not None else None)
    if not name:
        return None
    name = _PARAM.sub("", name)
    if "._parameters[" in name:
        return None
    return normalize_path(name)


def param_owners(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) → FQNs of the modules holding it directly (several when tied)."""
    owners: dict[int, list[str]] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for p in mod.parameters(recurse=False):
            owners.setdefault(id(p), [])
            if mname not in owners[id(p)]:
                owners[id(p)].append(mname)
    return owners


def map_owners(state: CompileState) -> None:
    owners = param_owners(state.model) if state.model is not None else None
    for s in state.sites:
        stack, source = _from_stack(s.node), _from_source(s.weight_node)
        if owners is not None:
            cands = owners.get(id(s.weight), [])
            if stack in cands:
                s.fqn, s.owner_via = stack, "nn_module_stack"
            elif cands:
                s.fqn, s.owner_via = cands[0], "parameter identity"
                continue
        if not s.fqn and stack is not None:
            s.fqn, s.owner_via = stack, "nn_module_stack"
        elif not s.fqn and source is not None:
            s.fqn, s.owner_via = source, "grapharg"
        elif not s.fqn:
            s.fqn, s.owner_via = s.weight_node.name, "graph node name"
