"""Pass: rewrite each decided site into patchc ops.

* ``hybrid`` sites, and ``dense`` ones that only need W ⊙ M (no 2:4 tile, the cost model's dense):
  ``patchc::hybrid_linear(x, [weight], [bias], site_id)`` -- its entry picks the path per call
  (Triton kernel, reference, dense), always with the masked weight; fused groups were rewritten
  by ``fuse_siblings`` already.
* fallback sites (weights that will receive gradients, an input of another dtype):
  ``F.linear(x, patchc::masked_weight(weight), bias)``, so gradients reach the weight through the
  mask.
* sites whose mask keeps everything, or not in the plan, are left as they are.

A hybrid site's weight is packed here when something will read the packed form
(``runtime.needs_packing``: the generated kernels, a released entry); the reference path (CPU)
needs no pack, and its decision reports the bytes the pack would take (``packing.packed_nbytes``).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from patchc import runtime
from patchc.stats import counters
from patchc.decisions import HYBRID, SKIPPED
from patchc.packing import packed_nbytes

from .state import CompileState, compile_pass, progress

_META = ("nn_module_stack", "stack_trace", "source_fn_stack", "example_value")
_FALLBACK_CODES = ("grad", "input_dtype")


@compile_pass(reads=("sites", "gm", "site.decision", "site.entry", "site.member", "site.group", "site.tile_mask",
                     "site.weight", "site.node", "site.x", "site.weight_node", "site.bias_node", "site.transposed"),
              writes=("gm", "site.node", "site.decision"))
def rewrite_linears(state: CompileState) -> None:
    g = state.gm.graph
    for s in progress(state.sites, "packing weights"):
        d = s.decision
        if d is None or s.entry is None or d.action == SKIPPED:
            continue
        e = s.entry
        if d.action == HYBRID:
            if e.packed is None and not runtime.needs_packing(e, s.weight.device):
                nbytes = packed_nbytes(s.tile_mask, s.dtype)       # the reference path runs it: no pack
            elif s.group is not None:
                nbytes = packed_nbytes(s.tile_mask, s.dtype)       # the member's share of its group's pack
            else:
                nbytes = e.packed_for([s.weight]).nbytes()
            s.decision = dataclasses.replace(d, packed_bytes=nbytes, site_id=e.site_id)
            counters["sites_rewritten"] += 1
        else:
            s.decision = dataclasses.replace(d, site_id=e.site_id)
            counters["sites_masked_dense"] += 1
        if s.group is not None:          # rewritten with its group; its old node has no users left
            continue
        with g.inserting_before(s.node):
            if d.why.code in _FALLBACK_CODES:
                w = g.call_function(torch.ops.patchc.masked_weight.default, (s.weight_node, e.site_id, 0))
                if s.transposed:
                    w = g.call_function(torch.t, (w,))
                new = g.call_function(F.linear, (s.x, w, s.bias_node))
            else:
                biases = [s.bias_node] if s.bias_node is not None else []
                new = g.call_function(torch.ops.patchc.hybrid_linear.default, (s.x, [s.weight_node], biases, e.site_id))
        new.meta.update({k: v for k, v in s.node.meta.items() if k in _META})
        s.node.replace_all_uses_with(new)
        g.erase_node(s.node)
        s.node = new
    g.eliminate_dead_code()
    g.lint()
    state.gm.recompile()
