"""Pass 4: rewrite each decided site into one call of a patchc custom op.

``hybrid`` sites become ``patchc::hybrid_linear(x, weight, bias, site_id)``; masked ``dense``
sites become ``patchc::masked_linear`` (the mask applied on the fly), so every path computes
with the masked weight.  Sites whose mask keeps everything are left as they are.  A hybrid
site's weight is packed here when something will read the packed form (``runtime.needs_packing``:
the generated kernels, a released entry); the reference path (CPU) needs no pack, and its
decision reports the bytes the pack would take (``packing.packed_nbytes``, exact).
"""
from __future__ import annotations

import dataclasses

import torch

from patchc import runtime
from patchc.packing import packed_nbytes
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
            if s.entry.packed is None and not runtime.needs_packing(s.entry, s.weight):
                nbytes = packed_nbytes(s.tile_mask, s.dtype)       # the reference path runs it: no pack
            else:
                packed = s.entry.packed if s.entry.packed is not None else s.entry.packed_for(s.weight)
                nbytes = packed.nbytes()
            s.decision = dataclasses.replace(d, packed_bytes=nbytes, site_id=s.entry.site_id)
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
