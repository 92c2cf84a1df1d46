"""Pass: generate the Triton kernels of every ``hybrid`` site and attach their launcher.

For each hybrid entry (a site, or a fused group once): take the cost model's ``DispatchPlan``
(``site.layout`` / ``group.plan``), build a ``HybridRunner`` (one kernel per hybrid M range;
BLOCK_N / BLOCK_K fixed per weight), render + cache its kernels and list them on the entry
(``entry.kernels``), set ``entry.runner`` (what ``runtime.choose_path`` asks for the kernel of a
call), and record the kernel for the example M in the site's decision ("dense" where the plan
dispatches to dense).  Kernels are generated on machines without a GPU too, so they can be
inspected there.  A shape no kernel serves (``UnsupportedSpec``) leaves the site on the
reference path with a ``no_kernel`` note.  Errors of the cost model are not caught: they are bugs.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Optional

from patchc.codegen.launch import INTERPRET_MSG, interpreter_active
from patchc.codegen.runner import HybridRunner
from patchc.codegen.spec import UnsupportedSpec
from patchc.decisions import HYBRID
from patchc.stats import counters

from .plan_cache import layout_record
from .state import CompileState, LinearSite, compile_pass, progress

log = logging.getLogger("patchc")


def _example_m(site: LinearSite) -> Optional[int]:
    xv = site.x.meta.get("example_value") if hasattr(site.x, "meta") else None
    if xv is None or not xv.dim() or not all(isinstance(d, int) for d in xv.shape):
        return None                  # symbolic sizes: never int() them (that would add a guard)
    return xv.numel() // max(1, xv.shape[-1])


def _attach(entry, n, k, dtype, tile, plan, bias: bool, cfg, interpret: bool, force: bool):
    """Build (or reuse) the entry's runner for ``plan`` and generate its kernels; returns the runner."""
    params = (n, k, str(dtype), tuple(tile), cfg.cache_dir, id(plan))
    runner = entry.runner
    if not isinstance(runner, HybridRunner) or getattr(runner, "params", None) != params:
        runner = HybridRunner.from_plan(n, k, dtype, tile, plan, cache_dir=cfg.cache_dir)
        runner.params = params
    kernels = runner.kernels(bias, interpret, force)
    if not kernels:          # dense at every M: still generate the kernel kernel="triton" would run
        kernels = runner.kernels(bias, interpret, force=True)
    entry.runner, entry.kernels = runner, kernels
    return runner


@compile_pass(reads=("sites", "config", "site.decision", "site.entry", "site.group", "site.layout", "site.tile_mask",
                     "site.weight", "site.x", "site.bias_node", "site.fqn", "group.entry", "group.plan", "group.members"),
              writes=("site.decision",))
def generate_kernels(state: CompileState) -> None:
    cfg = state.config
    done: dict = {}                    # id(entry) -> runner or the UnsupportedSpec it raised
    for s in progress(state.sites, "generating kernels"):
        d = s.decision
        if d is None or d.action != HYBRID:
            continue
        interpret = cfg.kernel == "triton" and s.weight.device.type != "cuda"
        if interpret and not interpreter_active():
            raise RuntimeError(INTERPRET_MSG)
        force = cfg.kernel == "triton"
        grp = s.group
        members = grp.members if grp is not None else [s]
        plan = grp.plan if grp is not None else s.layout
        bias = any(m.bias_node is not None for m in members)
        if id(s.entry) not in done:
            if s.entry.packed is None:
                s.entry.row_order = plan.row_order          # packed (once) by rewrite_linears in this order
            try:
                with counters.timed("codegen_seconds"):
                    done[id(s.entry)] = _attach(s.entry, sum(m.n for m in members), s.k, s.dtype, s.tile_mask.tile,
                                                plan, bias, cfg, interpret, force)
            except UnsupportedSpec as exc:   # e.g. a tile with no power-of-two block >= 16
                log.info("patchc: no generated kernel for %s: %s; the reference path runs it", s.entry.fqn, exc)
                done[id(s.entry)] = exc
        runner = done[id(s.entry)]
        if isinstance(runner, UnsupportedSpec):
            s.decision = dataclasses.replace(d.with_note("no_kernel", error=str(runner)), kernel=None)
            continue
        m = _example_m(s)
        current = runner.kernel_for(m, bias, interpret, force) if m else s.entry.kernels[0]
        layout = d.layout if d.layout is not None else layout_record(plan)
        s.decision = dataclasses.replace(d, kernel=current.name if current is not None else "dense", layout=layout)
