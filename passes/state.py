"""What flows between the passes: the compile state, the linear sites, the fused groups.

Passes talk only through these fields.  Each pass declares the fields it reads and writes
(``compile_pass``); ``FIELDS`` lists what may be named.  Site fields are named ``site.<field>``,
group fields ``group.<field>``, state fields by their name.  A test checks every pass module
against its declaration and the pipeline order against what each pass reads.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field, fields
from typing import Any, Optional

import torch
from torch import fx

from patchc.config import PatchConfig
from patchc.decisions import SiteDecision
from patchc.types import TileMask


@dataclass(eq=False)
class LinearSite:
    """A linear op found in a graph: y = x · Wᵀ (+ b) against a weight parameter."""

    node: fx.Node                   # the op computing the linear
    form: str                       # how it appeared: "linear", "addmm", "mm", "matmul"
    x: fx.Node                      # the input activation
    weight_node: fx.Node            # the placeholder / get_attr of the parameter
    weight: torch.Tensor            # the real parameter
    bias_node: Optional[fx.Node]
    transposed: bool                # parameter stored (in, out): the mask is of weight.t()
    fqn: str = ""                   # owning module
    owner_via: str = ""             # how the owner was found
    tile_mask: Optional[TileMask] = None
    entry: Any = None               # runtime.Entry that runs the site (its group's once fused)
    member: int = 0                 # the site's index among its entry's members
    decision: Optional[SiteDecision] = None
    layout: Any = None              # the cost model's DispatchPlan
    group: Any = None               # the FusedGroup it belongs to

    @property
    def n(self) -> int:
        return self.weight.shape[1] if self.transposed else self.weight.shape[0]

    @property
    def k(self) -> int:
        return self.weight.shape[0] if self.transposed else self.weight.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype


@dataclass(eq=False)
class FusedGroup:
    """Sibling sites run as one entry: its dispatch plan, members (in output order), input node."""

    entry: Any                       # runtime.Entry with one member per site
    plan: Any                        # the group's DispatchPlan
    members: list                    # LinearSite
    x: fx.Node
    node: Optional[fx.Node] = None   # the hybrid_linear call
    predicted: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return sum(s.n for s in self.members)


@dataclass(eq=False)
class CompileState:
    """One backend invocation: the FX graph, its example inputs, the options and the plan."""

    gm: fx.GraphModule
    example_inputs: list
    config: PatchConfig
    plan: Any = None                # MaskPlan or None (infer from weights)
    model: Optional[torch.nn.Module] = None   # known for patchc.compile: owner lookup by identity
    graph_id: int = 0
    sites: list[LinearSite] = field(default_factory=list)
    groups: list[FusedGroup] = field(default_factory=list)

    def input_value(self, node: fx.Node):
        """The real tensor behind a placeholder or get_attr node (None when not known)."""
        if node.op == "placeholder":
            idx = [n for n in self.gm.graph.nodes if n.op == "placeholder"].index(node)
            return self.example_inputs[idx] if idx < len(self.example_inputs) else None
        if node.op == "get_attr":
            obj = self.gm
            for part in str(node.target).split("."):
                obj = getattr(obj, part, None)
            return obj
        return None

    def entries(self) -> list:
        """The distinct runtime entries the rewritten graph calls (the graph's record owns them)."""
        out = {}
        for s in self.sites:
            if s.entry is not None and s.decision is not None and s.decision.action != "skipped":
                out.setdefault(id(s.entry), s.entry)
        return list(out.values())


FIELDS = frozenset([f.name for f in fields(CompileState)]
                   + [f"site.{f.name}" for f in fields(LinearSite)]
                   + [f"group.{f.name}" for f in fields(FusedGroup)])


def compile_pass(reads: tuple[str, ...], writes: tuple[str, ...]):
    """Declare what a pass reads and writes (names from ``FIELDS``)."""
    bad = sorted((set(reads) | set(writes)) - FIELDS)
    if bad:
        raise ValueError(f"undeclared compile-state fields {bad}")

    def deco(fn):
        fn.reads, fn.writes = tuple(reads), tuple(writes)
        return fn
    return deco


# ---- where a parameter comes from: dynamo's source names ------------------------------------------
_ROOT = re.compile(r"^[A-Za-z_]\w*(\[[^\]]*\])*")
_MOD = re.compile(r"\._modules\[['\"]([^'\"]+)['\"]\]")
_IDX = re.compile(r"\[(\d+)\]")
_PARAM = re.compile(r"\._parameters\[['\"]([^'\"]+)['\"]\]$")


def normalize_path(path: str) -> str:
    """``L['self'].model.layers[0]._modules['q_proj']`` → ``model.layers.0.q_proj``."""
    rest = _ROOT.sub("", path, count=1)
    rest = _MOD.sub(r".\1", rest)
    rest = _IDX.sub(r".\1", rest)
    return rest.lstrip(".")


def source_fqn(weight_node: fx.Node) -> Optional[str]:
    """The FQN of the module owning a parameter node, from dynamo's source (``meta["grapharg"]``)."""
    ga = weight_node.meta.get("grapharg")
    src = getattr(ga, "source", None)
    name = src.name if isinstance(getattr(src, "name", None), str) else (src.name() if src is not None else None)
    if not name:
        return None
    name = _PARAM.sub("", name)
    if "._parameters[" in name:
        return None
    return normalize_path(name)


def _tty() -> bool:
    return sys.stderr.isatty()


def progress(sites: list, desc: str):
    """The sites, under a tqdm bar on stderr (``patchc: <desc>``) when there are many of them
    (packing and kernel generation take seconds per large weight) and stderr is a terminal."""
    if len(sites) < 16 or not _tty():
        return sites
    from tqdm.auto import tqdm
    return tqdm(sites, desc=f"patchc: {desc}", leave=False, dynamic_ncols=True)
