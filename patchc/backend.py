"""The ``patch`` torch.compile backend (registered through the ``torch_dynamo_backends`` entry point).

Thin: parse the options, find the plan, run the pass pipeline, hand the rest to inductor or eager.
Every invocation leaves a ``GraphRecord`` that ``patchc.explain`` reads.
"""
from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .config import PatchConfig
from .types import SiteDecision

log = logging.getLogger("patchc")
_GRAPH_IDS = itertools.count()


@dataclass(eq=False)
class GraphRecord:
    """What one backend invocation did (one FX graph)."""

    graph_id: int
    decisions: list[SiteDecision]
    plan_keys: tuple[str, ...]           # FQNs of the plan (empty when inferred)
    params: list                         # weakrefs to the parameters the graph reads
    sites: list = field(default_factory=list, repr=False)    # LinearSite objects (kernels, layouts)
    seconds: dict = field(default_factory=dict)
    config: Optional[PatchConfig] = None

    def param_ids(self) -> set[int]:
        return {id(p) for p in (r() for r in self.params) if p is not None}


_RECORDS: list[GraphRecord] = []
_RECORDS_LOCK = threading.Lock()

_PLAN_CACHE: dict[tuple, Any] = {}


def load_plan(path: str):
    """Load a mask file once per (path, size, mtime) per process."""
    from .plan import MaskPlan
    st = os.stat(path) if os.path.exists(path) else None
    key = (os.path.abspath(path), st.st_size if st else None, st.st_mtime_ns if st else None)
    if key not in _PLAN_CACHE:
        _PLAN_CACHE[key] = MaskPlan.load(path)
    return _PLAN_CACHE[key]


def resolve_plan(cfg: PatchConfig):
    if cfg.plan is None:
        return None
    return load_plan(cfg.plan) if isinstance(cfg.plan, str) else cfg.plan


def _dump(cfg: PatchConfig, graph_id: int, idx: int, name: str, gm) -> None:
    if not cfg.dump_dir:
        return
    os.makedirs(cfg.dump_dir, exist_ok=True)
    path = os.path.join(cfg.dump_dir, f"graph{graph_id:03d}_{idx:02d}_{name}.py")
    with open(path, "w") as f:
        f.write(gm.print_readable(print_output=False))


def run_pipeline(gm, example_inputs, cfg: PatchConfig, model=None, session=None):
    """Run the passes on ``gm`` in place; return the ``GraphRecord``."""
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
                      state.sites, seconds, cfg)
    with _RECORDS_LOCK:
        _RECORDS.append(rec)
    if session is not None:
        session.records.append(rec)
    n_h = sum(d.action == "hybrid" for d in rec.decisions)
    log.info("patchc: graph %d: %d linear sites, %d hybrid (%.3f s in passes)",
             rec.graph_id, len(rec.decisions), n_h, sum(seconds.values()))
    return rec


def compile_inner(gm, example_inputs, cfg: PatchConfig):
    if cfg.inner == "eager":
        return gm.forward
    from torch._inductor.compile_fx import compile_fx
    patches = {}
    if cfg.mode is not None and cfg.mode != "default":
        patches = torch._inductor.list_mode_options(cfg.mode)
    return compile_fx(gm, example_inputs, config_patches=patches)


def patch_backend(gm, example_inputs, options: Optional[dict] = None, mode: Optional[str] = None,
                  _model=None, _session=None, **kwargs):
    """The torch.compile backend ``"patch"``. ``options`` are parsed into ``PatchConfig``."""
    if kwargs:
        raise ValueError(f"patch backend got unexpected keyword argument(s) {sorted(kwargs)}")
    cfg = PatchConfig.from_options(options, mode=mode)
    run_pipeline(gm, example_inputs, cfg, model=_model, session=_session)
    return compile_inner(gm, example_inputs, cfg)


def records() -> list[GraphRecord]:
    with _RECORDS_LOCK:
        return list(_RECORDS)
