"""Pass 4: rewrite each decided site into one call of a patchc custom op.

``hybrid`` sites become ``patchc::hybrid_linear(x, weight, bias, site_id)``; masked ``dense``
sites become ``patchc::masked_linear`` (the mask applied on the fly), so every path computes
with the masked weight.  Sites whose mask keeps everything are left as they are.
"""
from __future__ import annotations

import dataclasses

import torch

from patchc.runtime import counters

from .state import CompileState


def rewrite_linears(state: CompileState) -> None:
    g = state.gm.graph
    for s in state.sites:
        d = s.decision
        if d is None or s.entry is None or d.action == "skipped":
            continue
        if d.action == "hybrid":
            op = torch.ops.patchc.hybrid_linear.default
            packed = s.entry.packed if s.entry.packed is not None else s.entry.packed_for(s.weight)
            s.decision = dataclasses.replace(d, packed_bytes=packed.nbytes(), site_id=s.entry.site_id)
            counters["sites_rewritten"] += 1
        else:
            op = torch.ops.patchc.masked_linear.default
            s.decision = dataclasses.replace(d, site_id=s.entry.site_id)
            counters["sites_masked_dense"] += 1
        with g.inserting_before(s.node):
            new = g.call_function(op, (s.x, s.weight_node, s.bias_node, s.entry.site_id))
        new.meta.update({k: v for k, v in s.node.meta.items() if k in ("nn_module_stack", "stack_trace",
                                                                        "source_fn_stack", "example_value")})
        s.node.replace_all_uses_with(new)
        g.erase_node(s.node)
        s.node = new
    g.eliminate_dead_code()
    g.lint()
    state.gm.recompile()
