"""Public entry points: ``patchc.compile``, ``patchc.explain``, ``patchc.kernels``."""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from .backend import GraphRecord, records, resolve_plan
from .config import PatchConfig
from .plan import infer_plan
from .types import SiteDecision

log = logging.getLogger("patchc")


@dataclass(eq=False)
class CompileSession:
    """Artifacts of one ``patchc.compile`` call (kept on the returned object as ``_patchc``)."""

    model: nn.Module
    config: PatchConfig
    plan: Any
    records: list[GraphRecord] = field(default_factory=list)


def compile(model: nn.Module, plan=None, **options):  # noqa: A001 - mirrors torch.compile
    """Programmatic twin of ``torch.compile(model, backend="patch", options=...)``.

    The plan (a ``MaskPlan`` or a mask file path; ``None`` infers it from the weights) is
    validated against the model up front: a missing FQN or a shape mismatch raises here.
    ``mode`` is forwarded to inductor; other keywords are ``PatchConfig`` options.
    """
    mode = options.pop("mode", None)
    dynamic = options.pop("dynamic", None)
    cfg = PatchConfig.from_options({**options, "plan": plan}, mode=mode)
    plan_obj = resolve_plan(cfg)
    if plan_obj is not None:
        plan_obj.validate_against(model)
        cfg = cfg.replace(plan=plan_obj)
    if cfg.release_dense:
        release_dense(model, plan_obj if plan_obj is not None else infer_plan(model, cfg.tile), cfg)
    session = CompileSession(model, cfg, plan_obj)
    backend = functools.partial(_session_backend, cfg=cfg, session=session)
    compiled = torch.compile(model, backend=backend, dynamic=dynamic)
    compiled._patchc = session
    return compiled


def release_dense(model: nn.Module, plan, cfg: PatchConfig) -> int:
    """Pack every planned weight that has 2:4 tiles and free its dense storage (inference only).

    Tied weights (used by another module, e.g. an embedding) are kept.  Returns the bytes freed.
    """
    from patchc.passes.map_owners import param_owners

    from . import runtime
    from .modules import is_transposed
    owners = param_owners(model)
    mods = dict(model.named_modules())
    freed = 0
    for name, tm in plan.items():
        mod = mods[name]
        w = mod.weight
        if tm.num_sparse_tiles() == 0 or getattr(w, "_patchc_site", None) is not None:
            continue
        if len(owners.get(id(w), [])) > 1:
            log.warning("patchc: release_dense keeps %s: its weight is shared with %s", name, owners[id(w)])
            continue
        entry = runtime.register_site(w, tm, is_transposed(mod), name)
        from patchc.passes.choose_layouts import plan_for
        entry.row_order = plan_for(tm, w.dtype, cfg.device, cfg.m_max, cfg.cache_dir).row_order
        if w.requires_grad:
            w.requires_grad_(False)
            log.info("patchc: release_dense froze %s (its dense weight is gone)", name)
        freed += w.numel() * w.element_size()
        entry.release(w)
    log.info("patchc: release_dense freed %.1f MiB of dense weights", freed / 2**20)
    return freed


def _session_backend(gm, example_inputs, cfg: PatchConfig, session: CompileSession, **_):
    from .backend import compile_inner, run_pipeline
    run_pipeline(gm, example_inputs, cfg, model=session.model, session=session)
    return compile_inner(gm, example_inputs, cfg)


# ---- explain ---------------------------------------------------------------------------------
def _root_module(obj) -> Optional[nn.Module]:
    if isinstance(obj, nn.Module):
        return getattr(obj, "_orig_mod", obj)
    orig = getattr(obj, "_torchdynamo_orig_callable", None) or getattr(obj, "__wrapped__", None)
    target = orig if orig is not None else obj
    owner = getattr(target, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


def _records_for(obj) -> tuple[list[GraphRecord], Optional[nn.Module]]:
    session = getattr(obj, "_patchc", None)
    if session is not None:
        return list(session.records), session.model
    model = _root_module(obj)
    if model is None:
        raise TypeError(f"patchc.explain expects a compiled nn.Module or a compiled bound method of one, "
                        f"got {type(obj).__name__}")
    ids = {id(p) for p in model.parameters()}
    return [r for r in records() if r.param_ids() & ids], model


@dataclass
class ExplainReport:
    """``decisions``: one ``SiteDecision`` per linear site; ``str()`` is a readable table."""

    decisions: list[SiteDecision]
    unmatched_plan_entries: list[str]
    graphs: int
    compiled: bool
    message: str = ""

    def counts(self) -> dict[str, int]:
        out = {"hybrid": 0, "dense": 0, "skipped": 0}
        for d in self.decisions:
            out[d.action] += 1
        return out

    def __str__(self) -> str:
        if not self.compiled:
            return self.message
        c = self.counts()
        packed = sum(d.packed_bytes for d in self.decisions if d.action == "hybrid")
        dense = sum(d.dense_bytes for d in self.decisions if d.action == "hybrid")
        head = (f"patchc: {len(self.decisions)} linear sites in {self.graphs} graph(s): {c['hybrid']} hybrid, "
                f"{c['dense']} dense, {c['skipped']} skipped")
        if dense:
            head += f"; hybrid weights {packed / 2**20:.2f} MiB packed vs {dense / 2**20:.2f} MiB dense " \
                    f"({packed / dense:.1%})"
        rows = [("site", "N", "K", "dtype", "action", "2:4 tiles", "sparsity", "packed/dense", "kernel", "reason")]
        for d in self.decisions:
            ratio = f"{d.packed_bytes / d.dense_bytes:.3f}" if d.action == "hybrid" and d.dense_bytes else "-"
            disp = ""
            if d.layout and d.layout.get("summary"):       # the cost model's M dispatch, e.g. "M<=64 hybrid bm16; else dense"
                disp = " [" + d.layout["summary"] + "]"
            rows.append((d.fqn or "<root>", str(d.n), str(d.k), d.dtype, d.action, f"{d.frac_sparse:.2f}", f"{d.sparsity:.3f}",
                         ratio, d.kernel or "-", d.reason + disp))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        lines = [head, ""]
        for r in rows:
            lines.append("  ".join(v.ljust(w) for v, w in zip(r, widths)) + "  " + r[-1])
        if self.unmatched_plan_entries:
            lines.append("")
            lines.append(f"plan entries that matched no site ({len(self.unmatched_plan_entries)}): "
                         + ", ".join(self.unmatched_plan_entries))
        return "\n".join(lines)


def _was_compiled(obj, model) -> bool:
    code = None
    fwd = getattr(model, "forward", None) if model is not None else None
    code = getattr(getattr(fwd, "__func__", fwd), "__code__", None)
    if code is None:
        return False
    try:
        from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list
        return bool(_debug_get_cache_entry_list(code))
    except Exception:  # noqa: BLE001 - private API; absent means "unknown"
        return False


def explain(compiled) -> ExplainReport:
    """What the compiler did to each linear of ``compiled`` (a compiled module or bound method)."""
    recs, model = _records_for(compiled)
    if not recs:
        if _was_compiled(compiled, model):
            return ExplainReport([], [], 0, True, "")
        return ExplainReport([], [], 0, False,
                             "patchc: nothing compiled yet: torch.compile is lazy, call the compiled model once "
                             "(e.g. under torch.inference_mode()) and then explain it")
    latest: dict[tuple, SiteDecision] = {}
    for r in recs:                      # a recompile (new shapes) re-decides the same sites
        for d in r.decisions:
            latest[(d.fqn, d.node)] = d
    plan_keys = set().union(*(set(r.plan_keys) for r in recs))
    unmatched = sorted(plan_keys - {fqn for fqn, _ in latest})
    return ExplainReport(list(latest.values()), unmatched, len(recs), True)


def kernels(compiled) -> list:
    """The generated kernels (``GeneratedKernel``) of the compiled model's hybrid sites."""
    recs, _ = _records_for(compiled)
    out, seen = [], set()
    for r in recs:
        for s in r.sites:
            for k in getattr(s.entry, "kernels", None) or []:
                key = getattr(k, "path", None) or id(k)
                if key not in seen:
                    seen.add(key)
                    out.append(k)
    return out
