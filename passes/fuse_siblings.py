"""Pass: fuse sibling linears that read the same input into one kernel.

Linears that read the same activation -- q/k/v projections, gate/up of a gated MLP -- can run as
one hybrid kernel over their row-concatenated weights: one launch, the input read once.  On the
FX dataflow graph (networkx) the siblings of an input are the ``hybrid`` sites among its users;
they form a group when they share the exact input node, dtype, tile and K, every N is a multiple
of the tile height (so no tile-row straddles two members) and no member is released.  The cost
model decides per group: the fused plan's predicted time against the sum of the members' over
the dispatch grid (log-uniform in M); the group fuses when it is not slower on average.

A fused group becomes ONE ``patchc::hybrid_linear_group(x, [weights], [biases], group_id)`` call
whose output is narrowed back per member (views along the last dim), inserted before the first
member.  Each member keeps its own explain row (reason names the group; kernel is the group's);
its runtime entry becomes a ``FusedMember`` stand-in, so ``rewrite_linears`` neither packs it
nor leaves a call behind (the members' old nodes have no users left and are removed).  The group
packs once (``runtime.register_group``), in the group plan's row order.  Outputs never depend on
fusion firing: fused or not, every path computes with the masked weights.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from torch import fx

from patchc import runtime
from patchc.packing import packed_nbytes
from patchc.runtime import counters

from .choose_layouts import cached_json, layout_record, plan_for, plan_key
from .state import CompileState, LinearSite

_PREDICTIONS: dict = {}      # fusion key -> predictions (also on disk, next to the plans)

log = logging.getLogger("patchc")


@dataclass(eq=False)
class FusedGroup:
    """One fused group of the graph: its runtime entry, plan, members and call node."""

    entry: Any                       # runtime.GroupEntry
    plan: Any                        # the group's DispatchPlan
    members: list                    # LinearSite, in output order
    x: fx.Node
    node: Optional[fx.Node] = None   # the hybrid_linear_group call
    predicted: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return sum(s.n for s in self.members)


def _view_problem(node: fx.Node) -> Optional[str]:
    """Why a narrowed view of ``node``'s output may not stand in for it (None: it may).  A
    ``.view`` that only splits the last dim works on a slice; one that merges it does not."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true
    inp = node.meta.get("example_value")
    for u in node.users:
        if not (u.op == "call_method" and u.target == "view"):
            continue
        out = u.meta.get("example_value")
        lead = inp.dim() - 1 if inp is not None else -1
        if (out is None or inp is None or out.dim() < lead
                or not all(statically_known_true(a == b) for a, b in zip(out.shape[:lead], inp.shape[:-1]))):
            return f"its output is reshaped by {u.name} (.view), which a slice of the fused output may not allow"
    return None


def _groups(state: CompileState):
    """[(input node, [LinearSite...])]: hybrid sites that read the same input, from the dataflow graph."""
    import networkx as nx
    flow = nx.DiGraph()
    for node in state.gm.graph.nodes:
        for user in node.users:
            flow.add_edge(node, user)
    sites = {s.node: s for s in state.sites
             if s.decision is not None and s.decision.action == "hybrid" and s.entry is not None}
    order = {n: i for i, n in enumerate(state.gm.graph.nodes)}
    out = []
    for x in sorted(flow.nodes, key=order.get):
        sibs = sorted((sites[u] for u in flow.successors(x) if u in sites and sites[u].x is x), key=lambda s: order[s.node])
        if len(sibs) >= 2:
            out.append((x, sibs))
    return out, order


def _note(s: LinearSite, text: str) -> None:
    s.decision = dataclasses.replace(s.decision, reason=f"{s.decision.reason}; {text}")


def _compatible(x, sibs, order) -> list:
    """Split siblings into candidate groups; note on the others why they stay separate."""
    buckets: dict = {}
    for s in sibs:
        buckets.setdefault((s.dtype, tuple(s.tile_mask.tile), s.k), []).append(s)
    groups = []
    for (_, tile, _), members in buckets.items():
        ok = []
        for s in members:
            why = None
            if s.n % tile[0]:
                why = f"N={s.n} is not a multiple of the tile height {tile[0]}"
            elif getattr(s.entry, "released", False):
                why = "its dense weight was released"
            else:
                why = _view_problem(s.node)
            if why is None:
                ok.append(s)
            else:
                _note(s, f"not fused with its siblings: {why}")
        if len(ok) >= 2:
            first = min(order[s.node] for s in ok)
            deps = [d for s in ok for d in (s.weight_node, s.bias_node) if isinstance(d, fx.Node)]
            if all(order[d] < first for d in deps):
                groups.append(ok)
    return groups


def _decide(members, cfg) -> tuple[bool, Any, Any, dict]:
    """(fuse?, group mask, group plan, predictions): fused vs the sum of the members, over the
    dispatch grid, log-uniform in M."""
    from patchc.codegen.devices import get_device
    from patchc.codegen.layout import _grid, planned_us
    dev = get_device(cfg.device)
    tm = runtime.concat_masks([s.tile_mask for s in members])
    plan = plan_for(tm, members[0].dtype, cfg.device, cfg.m_max, cfg.cache_dir)

    def predict() -> dict:
        g = _grid(cfg.m_max)
        wt = np.diff(np.log(np.append(g, g[-1] + 1)))
        fused = planned_us(tm, plan, g, dev)
        apart = sum(planned_us(s.tile_mask, s.layout, g, dev) for s in members)
        mean = float(np.log(fused / apart) @ wt / wt.sum())
        return dict(fused_us_m1=float(fused[0]), separate_us_m1=float(apart[0]),
                    ratio_m1=float(fused[0] / apart[0]), mean_ratio=float(np.exp(mean)), mean_log_ratio=mean)

    # the prediction depends on the members' plans, i.e. on their plan keys (memo + disk)
    key = ("fusion",) + tuple(plan_key(s.tile_mask, s.dtype, cfg.device, cfg.m_max) for s in members)
    pred = _PREDICTIONS.get(key)
    if pred is None:
        pred = _PREDICTIONS[key] = cached_json("fusion", key, predict, cfg.cache_dir)
    return pred["mean_log_ratio"] <= 0.0, tm, plan, pred


def _rewrite(state: CompileState, grp: FusedGroup, order) -> None:
    g = state.gm.graph
    members = grp.members
    first = min(members, key=lambda s: order[s.node]).node
    biases = [s.bias_node for s in members if s.bias_node is not None]
    with g.inserting_before(first):
        call = g.call_function(torch.ops.patchc.hybrid_linear_group.default,
                               (grp.x, [s.weight_node for s in members], biases, grp.entry.site_id))
        call.meta.update({k: v for k, v in first.meta.items() if k in ("nn_module_stack", "stack_trace")})
        off = 0
        for s in members:
            view = g.call_function(torch.narrow, (call, -1, off, s.n))
            view.meta.update({k: v for k, v in s.node.meta.items()
                              if k in ("nn_module_stack", "stack_trace", "source_fn_stack", "example_value")})
            s.node.replace_all_uses_with(view)
            off += s.n
    grp.node = call


def fuse_siblings(state: CompileState) -> None:
    cfg = state.config
    if not cfg.fusion:
        return
    found, order = _groups(state)
    for x, sibs in found:
        for members in _compatible(x, sibs, order):
            fuse, tm, plan, pred = _decide(members, cfg)
            names = [s.fqn for s in members]
            if not fuse:
                for s in members:
                    _note(s, f"not fused with {', '.join(n for n in names if n != s.fqn)}: the cost model predicts "
                             f"{pred['mean_ratio']:.2f}x the separate time")
                continue
            weights = [s.weight for s in members]
            entry = runtime.register_group(weights, [s.entry for s in members], [s.bias_node is not None for s in members],
                                           tm)
            entry.kernel = cfg.kernel
            if entry.packed is None:
                entry.row_order = plan.row_order
                if runtime.needs_packing(entry, weights[0]):
                    entry.packed_for(weights)                   # packed once, here (like rewrite_linears)
            grp = FusedGroup(entry, plan, members, x, predicted=pred)
            _rewrite(state, grp, order)
            layout = layout_record(plan) | {"group": names, "group_id": entry.site_id}
            for s in members:
                share = packed_nbytes(s.tile_mask, s.dtype)
                s.entry = runtime.register_member(entry, s.entry, share)
                s.group = grp
                rest = s.decision.reason.replace("rewritten to patchc::hybrid_linear", "").strip("; ")
                s.decision = dataclasses.replace(
                    s.decision, layout=layout,
                    reason=(f"fused with {', '.join(n for n in names if n != s.fqn)} into one "
                            f"patchc::hybrid_linear_group call (N={grp.n}; predicted {pred['ratio_m1']:.2f}x the "
                            f"separate time at M=1)" + (f"; {rest}" if rest else "")))
            counters["sites_fused"] += len(members)
            counters["groups_fused"] += 1
            log.info("patchc: fused %s (N=%d)", " + ".join(names), grp.n)
