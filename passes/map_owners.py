"""Pass 2: map each site to the FQN of the module that owns it.

Order of evidence: the node's ``nn_module_stack`` (so a tied weight maps to the module that
*uses* it, e.g. ``lm_head`` rather than ``embed_tokens``), then the parameter's dynamo source
(``meta["grapharg"]``), then identity against the model's parameters (``patchc.compile``).
"""
from __future__ import annotations

from patchc.modules import param_owners

from .state import CompileState, compile_pass, normalize_path, source_fqn


def _from_stack(node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return normalize_path(path)


@compile_pass(reads=("sites", "model", "site.node", "site.weight_node", "site.weight"),
              writes=("site.fqn", "site.owner_via"))
def map_owners(state: CompileState) -> None:
    owners = param_owners(state.model) if state.model is not None else None
    for s in state.sites:
        stack, source = _from_stack(s.node), source_fqn(s.weight_node)
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
