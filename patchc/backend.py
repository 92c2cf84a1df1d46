"""The ``patch`` torch.compile backend (registered through the ``torch_dynamo_backends`` entry point).

Thin: parse the options, find the plan, run the pass pipeline, hand the rest to inductor or eager.
Every invocation leaves a ``GraphRecord`` (what ``patchc.explain`` reads) owned by the compiled
graph it describes: the callable handed back to dynamo holds it, so deleting the compiled model
(or ``torch._dynamo.reset()``) frees the record, its runtime entries and their packed weights.
This module keeps records only by weak reference.
"""
from __future__ import annotations

import itertools
import logging
import os
import re
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .caches import BoundedCache
from .config import PatchConfig
from .stats import counters

log = logging.getLogger("patchc")
_GRAPH_IDS = itertools.count()


@dataclass(eq=False)
class GraphRecord:
    """What one backend invocation did (one FX graph): its decisions, the runtime entries its
    rewritten graph calls (owned here), and the seconds each pass took."""

    graph_id: int
    decisions: list                      # SiteDecision, one per linear site
    plan_keys: tuple[str, ...]           # FQNs of the plan (empty when inferred)
    params: list                         # weakrefs to the parameters the graph reads
    entries: list = field(default_factory=list, repr=False)     # runtime.Entry
    seconds: dict = field(default_factory=dict)                 # pass name -> seconds
    config: Optional[PatchConfig] = None

    def param_ids(self) -> set[int]:
        return {id(p) for p in (r() for r in self.params) if p is not None}

    def kernels(self) -> list:
        """The generated kernels of the graph's entries."""
        return [k for e in self.entries for k in e.kernels]


_RECORDS: dict[int, weakref.ref] = {}          # graph id -> record, weakly, in compile order
_RECORDS_LOCK = threading.Lock()
_PLAN_FILES = BoundedCache("mask files", 16)   # (path, size, mtime) -> MaskPlan


def load_plan(path: str):
    """Load a mask file once per (path, size, mtime) per process."""
    from .plan import MaskPlan
    st = os.stat(path) if os.path.exists(path) else None
    key = (os.path.abspath(path), st.st_size if st else None, st.st_mtime_ns if st else None)
    def read():
        with counters.timed("load_seconds"):
            return MaskPlan.load(path)
    return _PLAN_FILES.get_or_compute(key, read)


def cached_plan_masks() -> list:
    """The TileMasks of the mask files cached by ``load_plan``."""
    return [tm for plan in _PLAN_FILES.values() for tm in plan.values()]


def resolve_plan(cfg: PatchConfig):
    if cfg.plan is None:
        return None
    return load_plan(cfg.plan) if isinstance(cfg.plan, str) else cfg.plan


def _dump(cfg: PatchConfig, graph_id: int, idx: int, name: str, gm) -> None:
    if not cfg.dump_dir:
        return
    from .files import atomic_write
    atomic_write(os.path.join(cfg.dump_dir, f"graph{graph_id:03d}_{idx:02d}_{name}.py"),
                 gm.print_readable(print_output=False))


def run_pipeline(gm, example_inputs, cfg: PatchConfig, model=None) -> GraphRecord:
    """Run the passes on ``gm`` in place; return the ``GraphRecord`` (registered weakly)."""
    from patchc.passes import PIPELINE
    from patchc.passes.state import CompileState

    state = CompileState(gm, list(example_inputs), cfg, resolve_plan(cfg), model, graph_id=next(_GRAPH_IDS))
    seconds = {}
    _dump(cfg, state.graph_id, 0, "input", gm)
    for i, p in enumerate(PIPELINE, 1):
        t0 = time.perf_counter()
        p(state)
        seconds[p.__name__] = time.perf_counter() - t0
        _dump(cfg, state.graph_id, i, p.__name__, gm)
    params = [weakref.ref(v) for v in example_inputs if isinstance(v, torch.nn.Parameter)]
    rec = GraphRecord(state.graph_id, [s.decision for s in state.sites], tuple(state.plan or ()), params,
                      state.entries(), seconds, cfg)
    with _RECORDS_LOCK:
        _RECORDS[rec.graph_id] = weakref.ref(rec, lambda _r, gid=rec.graph_id: _RECORDS.pop(gid, None))
    n_h = sum(d.action == "hybrid" for d in rec.decisions)
    log.info("patchc: graph %d: %d linear sites, %d hybrid (%.3f s in passes)",
             rec.graph_id, len(rec.decisions), n_h, sum(seconds.values()))
    return rec


def compile_inner(gm, example_inputs, cfg: PatchConfig, record: GraphRecord):
    """The rest of the graph through inductor (or eager); the callable returned holds ``record``."""
    if cfg.inner == "eager":
        fn = gm.forward
    else:
        from torch._inductor.compile_fx import compile_fx
        patches = {}
        if cfg.mode is not None and cfg.mode != "default":
            patches = torch._inductor.list_mode_options(cfg.mode)
        fn = compile_fx(gm, example_inputs, config_patches=patches)
    return _owning(fn, record)


def _owning(fn, record: GraphRecord):
    """A callable that runs ``fn`` and holds ``record`` (dynamo keeps what a backend returns for as
    long as the compiled graph lives; the function inductor returns may be unwrapped and dropped)."""
    def run(*args):
        return fn(*args)
    run._patchc_record = record
    return run


_WEIGHT_SOURCE = re.compile(r"\._parameters\[['\"]weight['\"]\]$")


def load_graph_weights(gm, example_inputs, weights) -> list[str]:
    """The ``weights`` option with the string backend: copy the file's tensors into the weight
    parameters this graph reads (found by their dynamo source), all checked first; returns the
    FQNs loaded.  Names the graph does not read belong to other graphs (or to no linear of the
    model: a graph with weights but no name in common gets a warning naming the file)."""
    from patchc.passes.state import normalize_path

    from .weights import copy_into, resolve
    path, tensors = resolve(weights)
    params = {}
    nodes = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, val in zip(nodes, example_inputs):
        src = getattr(node.meta.get("grapharg"), "source", None)
        name = src.name if isinstance(getattr(src, "name", None), str) else (src.name() if src is not None else "")
        m = _WEIGHT_SOURCE.search(name or "")
        if isinstance(val, torch.nn.Parameter) and m:
            params[normalize_path(name[: m.start()])] = val
    hits = [n for n in tensors if n in params]
    if params and not hits:
        log.warning("patchc: weights %s: none of its %d layers is read by this graph (its first: %s; the graph's "
                    "first: %s)", path, len(tensors), next(iter(tensors), "-"), next(iter(params)))
    copy_into(path, {n: params[n] for n in hits}, tensors)
    return hits


def patch_backend(gm, example_inputs, options: Optional[dict] = None, mode: Optional[str] = None, **kwargs):
    """The torch.compile backend ``"patch"``. ``options`` are parsed into ``PatchConfig``."""
    if kwargs:
        raise ValueError(f"patch backend got unexpected keyword argument(s) {sorted(kwargs)}")
    cfg = PatchConfig.from_options(options, mode=mode)
    if cfg.release_dense:
        raise ValueError("patchc: release_dense frees the model's dense weights, which a torch.compile backend "
                         "must not do behind the model's back; use patchc.compile(model, plan, release_dense=True)")
    if cfg.weights is not None:
        load_graph_weights(gm, example_inputs, cfg.weights)
    return compile_inner(gm, example_inputs, cfg, run_pipeline(gm, example_inputs, cfg))


def records() -> list[GraphRecord]:
    """The records of every compiled graph alive in this process, in compile order."""
    with _RECORDS_LOCK:
        refs = list(_RECORDS.values())
    return [r for r in (ref() for ref in refs) if r is not None]


def session_backend(session: Any):
    """The backend of one ``patchc.compile`` call: the pipeline with the model known (owner lookup
    by identity), the session's config, every record also kept by the session."""
    def backend(gm, example_inputs, **_):
        rec = run_pipeline(gm, example_inputs, session.config, model=session.model)
        session.records.append(rec)
        return compile_inner(gm, example_inputs, session.config, rec)
    backend.__name__ = backend.__qualname__ = "patch"     # what dynamo's error messages name
    return backend


def _hook_generate() -> None:
    from .generate import install_wrapper_hook
    install_wrapper_hook(patch_backend)


_hook_generate()
