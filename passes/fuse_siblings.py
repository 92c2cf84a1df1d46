"""Pass: fuse sibling linears that read the same input into one kernel.

Linears that read the same activation -- q/k/v projections, gate/up of a gated MLP -- can run as
one hybrid kernel over their row-concatenated weights: one launch, the input read once.  The
siblings of an input node are the ``hybrid`` sites among its ``users``; they form a group when they
share the dtype, tile and K, every N is a multiple of the tile height (so no tile-row straddles
two members) and no member is released.  The cost model decides per group: the fused plan's
predicted time against the sum of the members' over the dispatch grid (log-uniform in M); the
group fuses when it is not slower on average.

A fused group becomes ONE ``patchc::hybrid_linear(x, [weights], [biases], group_id)`` call whose
output is narrowed back per member (views along the last dim), inserted before the first member;
the members' old nodes lose their users and ``rewrite_linears`` removes them.  Each member keeps
its own explain row (a ``fused`` reason; kernel is the group's) and points at the group's entry
(``site.entry``, ``site.member``).  The group packs once, in the group plan's row order.  Outputs
never depend on fusion firing: fused or not, every path computes with the masked weights.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import torch
from torch import fx

from patchc import runtime
from patchc.stats import counters
from patchc.decisions import HYBRID, Reason
from patchc.maskops import concat_masks

from .plan_cache import PREDICTIONS, cached_json, layout_record, plan_for, plan_key
from .state import CompileState, FusedGroup, compile_pass

log = logging.getLogger("patchc")


def _view_problem(node: fx.Node):
    """The ``.view`` user of ``node`` that a narrowed view of its output may not stand in for
    (None: there is none).  A ``.view`` that only splits the last dim works on a slice; one
    that merges it does not."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true
    inp = node.meta.get("example_value")
    for u in node.users:
        if not (u.op == "call_method" and u.target == "view"):
            continue
        out = u.meta.get("example_value")
        lead = inp.dim() - 1 if inp is not None else -1
        if (out is None or inp is None or out.dim() < lead
                or not all(statically_known_true(a == b) for a, b in zip(out.shape[:lead], inp.shape[:-1]))):
            return u.name
    return None


def _groups(state: CompileState):
    """[(input node, [LinearSite...])]: hybrid sites that read the same input node (its users)."""
    sites = {s.node: s for s in state.sites if s.decision is not None and s.decision.action == HYBRID}
    order = {n: i for i, n in enumerate(state.gm.graph.nodes)}
    out = []
    for x in dict.fromkeys(s.x for s in sites.values()):
        sibs = sorted((sites[u] for u in x.users if u in sites and sites[u].x is x), key=lambda s: order[s.node])
        if len(sibs) >= 2:
            out.append((x, sibs))
    return sorted(out, key=lambda p: order[p[0]]), order


def _compatible(x, sibs, order) -> list:
    """Split siblings into candidate groups; note on the others why they stay separate."""
    buckets: dict = {}
    for s in sibs:
        buckets.setdefault((s.dtype, tuple(s.tile_mask.tile), s.k), []).append(s)
    groups = []
    for (_, tile, _), members in buckets.items():
        ok = []
        for s in members:
            view = _view_problem(s.node)
            if s.n % tile[0]:
                s.decision = s.decision.with_note("unfusable_height", n=s.n, tn=tile[0])
            elif s.entry.released:
                s.decision = s.decision.with_note("unfusable_released")
            elif view is not None:
                s.decision = s.decision.with_note("unfusable_view", node=view)
            else:
                ok.append(s)
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
    dev = get_device(cfg.device, cfg.cache_dir)
    tm = concat_masks([s.tile_mask for s in members])
    plan = plan_for(tm, members[0].dtype, cfg.device, cfg.m_max, cfg.cache_dir)

    def predict() -> dict:
        with counters.timed("cost_model_seconds"):
            return _predict()

    def _predict() -> dict:
        g = _grid(cfg.m_max)
        wt = np.diff(np.log(np.append(g, g[-1] + 1)))
        fused = planned_us(tm, plan, g, dev)
        apart = sum(planned_us(s.tile_mask, s.layout, g, dev) for s in members)
        mean = float(np.log(fused / apart) @ wt / wt.sum())
        return dict(fused_us_m1=float(fused[0]), separate_us_m1=float(apart[0]),
                    ratio_m1=float(fused[0] / apart[0]), mean_ratio=float(np.exp(mean)), mean_log_ratio=mean)

    # the prediction depends on the members' plans, i.e. on their plan keys (memo + disk)
    key = ("fusion",) + tuple(plan_key(s.tile_mask, s.dtype, cfg.device, cfg.m_max, cfg.cache_dir) for s in members)
    pred = PREDICTIONS.get_or_compute(key, lambda: cached_json("fusion", key, predict, cfg.cache_dir))
    return pred["mean_log_ratio"] <= 0.0, tm, plan, pred


def _rewrite(state: CompileState, grp: FusedGroup, order) -> None:
    g = state.gm.graph
    members = grp.members
    first = min(members, key=lambda s: order[s.node]).node
    biases = [s.bias_node for s in members if s.bias_node is not None]
    with g.inserting_before(first):
        call = g.call_function(torch.ops.patchc.hybrid_linear.default,
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


@compile_pass(reads=("sites", "config", "gm", "site.decision", "site.entry", "site.tile_mask", "site.layout",
                     "site.x", "site.node", "site.weight", "site.weight_node", "site.bias_node", "site.fqn",
                     "site.transposed", "group.entry", "group.members", "group.x", "group.node"),
              writes=("groups", "gm", "site.entry", "site.member", "site.group", "site.decision", "group.node"))
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
                    s.decision = s.decision.with_note("fusion_slower", ratio=pred["mean_ratio"],
                                                      others=", ".join(n for n in names if n != s.fqn))
                continue
            weights = [s.weight for s in members]
            entry = runtime.entry_for(weights, [s.tile_mask for s in members], [s.transposed for s in members],
                                      names, [s.bias_node is not None for s in members], tm)
            entry.kernel = cfg.kernel
            if entry.packed is None:
                entry.row_order = plan.row_order
                if runtime.needs_packing(entry, weights[0].device):
                    entry.packed_for(weights)                   # packed once, here (like rewrite_linears)
            grp = FusedGroup(entry, plan, members, x, predicted=pred)
            _rewrite(state, grp, order)
            state.groups.append(grp)
            layout = layout_record(plan) | {"group": names, "group_id": entry.site_id}
            for i, s in enumerate(members):
                s.entry, s.member, s.group = entry, i, grp
                s.decision = dataclasses.replace(
                    s.decision, layout=layout,
                    why=Reason("fused", {"others": ", ".join(n for n in names if n != s.fqn), "n": grp.n,
                                         "ratio_m1": pred["ratio_m1"]}))
            counters["sites_fused"] += len(members)
            counters["groups_fused"] += 1
            log.info("patchc: fused %s (N=%d)", " + ".join(names), grp.n)
