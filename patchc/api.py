"""Public entry points: ``patchc.compile``, ``patchc.explain``, ``patchc.kernels``, ``patchc.memory_report``."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from .backend import GraphRecord, records, resolve_plan, session_backend
from .config import PatchConfig
from .decisions import SiteDecision
from .generate import CompiledGenerate
from .release import release_dense

log = logging.getLogger("patchc")


@dataclass(eq=False)
class CompileSession:
    """What one ``patchc.compile`` call made (kept on the returned object as ``_patchc``)."""

    model: nn.Module
    config: PatchConfig
    plan: Any
    records: list[GraphRecord] = field(default_factory=list)


def compile(model: nn.Module, plan=None, **options):  # noqa: A001 - mirrors torch.compile
    """Programmatic twin of ``torch.compile(model, backend="patch", options=...)``.

    The plan (a ``MaskPlan`` or a mask file path; ``None`` infers it from the weights) is
    validated against the model up front: a missing FQN or a shape mismatch raises here.
    ``weights=`` (a weights file or ``{fqn: tensor}``) is loaded into the model's linear weights
    first, every tensor checked against the model (no parameter changes when one does not fit).
    ``mode`` and ``dynamic`` are forwarded to torch.compile / inductor; other keywords are
    ``PatchConfig`` options.  The result calls the compiled forward, and its ``generate(...)``
    (transformers models) runs the compiled forward too.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patchc.compile expects an nn.Module, got {type(model).__name__}")
    dynamic = options.pop("dynamic", None)
    cfg = PatchConfig.from_options({**options, "plan": plan}, mode=options.pop("mode", None))
    plan_obj = resolve_plan(cfg)
    if plan_obj is not None:
        plan_obj.validate_against(model)
        cfg = cfg.replace(plan=plan_obj)
    if cfg.weights is not None:             # into the parameters before anything reads them
        from .weights import load_weights
        n = len(load_weights(model, cfg.weights))
        log.info("patchc: loaded %d updated weights from %s", n, cfg.weights if isinstance(cfg.weights, str) else "a dict")
        cfg = cfg.replace(weights=None)
    if cfg.release_dense:
        from .plan import infer_plan
        release_dense(model, plan_obj if plan_obj is not None else infer_plan(model, cfg.tile), cfg)
    session = CompileSession(model, cfg, plan_obj)
    compiled = torch.compile(model, backend=session_backend(session), dynamic=dynamic)
    # on the wrapper itself: OptimizedModule.__setattr__ would set them on the user's model
    object.__setattr__(compiled, "_patchc", session)
    if callable(getattr(model, "generate", None)):
        object.__setattr__(compiled, "generate", CompiledGenerate(model, session_backend(session), dynamic))
    return compiled


# ---- explain ---------------------------------------------------------------------------------
def _root_module(obj) -> Optional[nn.Module]:
    if isinstance(obj, nn.Module):
        return getattr(obj, "_orig_mod", obj)
    orig = getattr(obj, "_torchdynamo_orig_callable", None) or getattr(obj, "__wrapped__", None)
    target = orig if orig is not None else obj
    owner = getattr(target, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


def _records_for(obj) -> list[GraphRecord]:
    session = getattr(obj, "_patchc", None)
    if session is not None:
        return list(session.records)
    model = _root_module(obj)
    if model is None:
        raise TypeError(f"patchc.explain expects a compiled nn.Module or a compiled bound method of one, "
                        f"got {type(obj).__name__}")
    ids = {id(p) for p in model.parameters()}
    return [r for r in records() if r.param_ids() & ids]


@dataclass
class ExplainReport:
    """``decisions``: one ``SiteDecision`` per linear site; ``seconds``: per pass, summed over the
    graphs; ``str()`` is a readable table."""

    decisions: list[SiteDecision]
    unmatched_plan_entries: list[str]
    graphs: int
    seconds: dict = field(default_factory=dict)
    compiled: bool = True
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
            disp = f" [{d.layout['summary']}]" if d.layout and d.layout.get("summary") else ""
            rows.append((d.fqn or "<root>", str(d.n), str(d.k), d.dtype, d.action, f"{d.frac_sparse:.2f}",
                         f"{d.sparsity:.3f}", ratio, d.kernel or "-", d.reason + disp))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        lines = [head, ""] + ["  ".join(v.ljust(w) for v, w in zip(r, widths)) + "  " + r[-1] for r in rows]
        if self.unmatched_plan_entries:
            lines += ["", f"plan entries that matched no site ({len(self.unmatched_plan_entries)}): "
                      + ", ".join(self.unmatched_plan_entries)]
        return "\n".join(lines)


NOT_COMPILED = ("patchc: nothing compiled yet: torch.compile is lazy, call the compiled model once "
                "(e.g. under torch.inference_mode()) and then explain it")


def explain(compiled) -> ExplainReport:
    """What the compiler did to each linear of ``compiled`` (a compiled module or bound method);
    before the first call (torch.compile is lazy) a report that says so."""
    recs = _records_for(compiled)
    if not recs:
        return ExplainReport([], [], 0, compiled=False, message=NOT_COMPILED)
    latest: dict[tuple, SiteDecision] = {}
    seconds: dict[str, float] = {}
    for r in recs:                      # a recompile (new shapes) re-decides the same sites
        for d in r.decisions:
            latest[(d.fqn, d.node)] = d
        for k, v in r.seconds.items():
            seconds[k] = seconds.get(k, 0.0) + v
    plan_keys = set().union(*(set(r.plan_keys) for r in recs))
    unmatched = sorted(plan_keys - {fqn for fqn, _ in latest})
    return ExplainReport(list(latest.values()), unmatched, len(recs), seconds)


def kernels(compiled) -> list:
    """The generated kernels (``GeneratedKernel``) of the compiled model's hybrid sites."""
    out, seen = [], set()
    for r in _records_for(compiled):
        for k in r.kernels():
            key = getattr(k, "path", None) or id(k)
            if key not in seen:
                seen.add(key)
                out.append(k)
    return out


def memory_report(compiled=None) -> dict:
    """What patchc holds now, in bytes.

    ``entries``: per runtime entry (of ``compiled`` -- a compiled model, bound method or the model
    itself -- or every live one) its packed form, its masked dense copy (W ⊙ M for the reference
    and dense paths; 0 when the weights already hold it), the masks it holds and the dense bytes of
    its weights; ``total`` sums them.  ``mask_files``: bytes of the masks of the mask files cached
    by path; ``caches``: entries per process-wide cache (``patchc.reset()`` clears them)."""
    from . import runtime
    from .backend import cached_plan_masks
    from .caches import all_caches
    entries = runtime.live_entries() if compiled is None else \
        list({id(e): e for r in _records_for(compiled) for e in r.entries}.values())
    rows = []
    for e in entries:
        dense = e._dense[3] if e._dense is not None else None
        rows.append({"site_id": e.site_id, "fqn": e.fqn, "released": e.released,
                     "packed_bytes": e.packed.nbytes() if e.packed is not None else 0,
                     "dense_bytes": sum(m.n * m.tile_mask.shape[1] for m in e.members) * _elt(e),
                     "masked_copy_bytes": dense.numel() * dense.element_size() if dense is not None else 0,
                     "mask_bytes": e.tile_mask.held_nbytes() if e.n_sites > 1 else 0})
    total = {k: sum(r[k] for r in rows) for k in ("packed_bytes", "dense_bytes", "masked_copy_bytes", "mask_bytes")}
    return {"entries": rows, "total": total,
            "mask_files": sum(tm.held_nbytes() for tm in cached_plan_masks()),
            "caches": {n: len(c) for n, c in all_caches().items()}}


def _elt(entry) -> int:
    dt = entry.dtype
    return torch.empty((), dtype=dt).element_size() if dt is not None else 0
