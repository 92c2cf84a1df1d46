"""What flows between the passes: the graph being compiled and the linear sites found in it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import fx

from patchc.config import PatchConfig
from patchc.types import SiteDecision, TileMask


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
    entry: Any = None               # runtime.SiteEntry once registered
    decision: Optional[SiteDecision] = None
    layout: Any = None              # cost-model result (codegen.layout)

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
class CompileState:
    """One backend invocation: the FX graph, its example inputs, the options and the plan."""

    gm: fx.GraphModule
    example_inputs: list
    config: PatchConfig
    plan: Any = None                # MaskPlan or None (infer from weights)
    model: Optional[torch.nn.Module] = None   # known for patchc.compile: owner lookup by identity
    sites: list[LinearSite] = field(default_factory=list)
    decisions: list[SiteDecision] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    graph_id: int = 0

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
