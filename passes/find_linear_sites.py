"""Pass 1: find every linear against a weight parameter, in each form dynamo produces.

Forms: ``torch._C._nn.linear`` / ``F.linear`` / ``aten.linear`` (x, W[, b]); ``addmm(b, x, Wᵗ)``;
``mm`` / ``matmul`` / ``@`` / ``x.matmul`` (x, Wᵗ).  The parameter may be used as stored
(out, in) behind a transpose, or stored (in, out) and used directly (``transposed=True``).
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from .state import CompileState, LinearSite, compile_pass

_LINEAR = {torch._C._nn.linear, F.linear, torch.ops.aten.linear.default}
_ADDMM = {torch.addmm, torch.ops.aten.addmm.default}
_MM = {torch.mm, torch.ops.aten.mm.default}
_MATMUL = {torch.matmul, operator.matmul, torch.ops.aten.matmul.default}


def _param(state: CompileState, node) -> nn.Parameter | None:
    if isinstance(node, fx.Node) and node.op in ("placeholder", "get_attr"):
        v = state.input_value(node)
        if isinstance(v, nn.Parameter) and v.dim() == 2:
            return v
    return None


def _is_transpose(node) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_method" and node.target == "t" or node.op == "call_function" and node.target in (
            torch.t, torch.ops.aten.t.default):
        return True
    if node.op == "call_function" and node.target is getattr and node.args[1] in ("T", "mT"):
        return True
    if (node.op == "call_method" and node.target in ("transpose", "permute")) or (
            node.op == "call_function" and node.target in (torch.transpose, torch.permute)):
        dims = tuple(node.args[1:]) if node.op == "call_method" else tuple(node.args[1:])
        if node.target in ("permute", torch.permute):
            dims = tuple(dims[0]) if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else dims
            return dims == (1, 0)
        return sorted(d % 2 for d in dims) == [0, 1] if len(dims) == 2 else False
    return False


def _weight_operand(state: CompileState, node):
    """For the right operand of x @ R: (weight node, parameter, transposed) or None."""
    p = _param(state, node)
    if p is not None:
        return node, p, True                       # x @ W with W stored (in, out)
    if _is_transpose(node):
        src = node.args[0]
        p = _param(state, src)
        if p is not None:
            return src, p, False                   # x @ W.t() with W stored (out, in)
    return None


def _target(node):
    return node.target if node.op == "call_function" else None


def _site(node: fx.Node, state: CompileState) -> LinearSite | None:
    t = _target(node)
    args, kwargs = node.args, node.kwargs
    if t in _LINEAR:
        x, w = args[0], args[1] if len(args) > 1 else kwargs.get("weight")
        b = args[2] if len(args) > 2 else kwargs.get("bias")
        p = _param(state, w)
        if p is None:
            return None
        return LinearSite(node, "linear", x, w, p, b, False)
    if t in _ADDMM or (node.op == "call_method" and node.target == "addmm"):
        if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1 or len(args) != 3:
            return None
        b, x, r = args
        found = _weight_operand(state, r)
        bias_val = b.meta.get("example_value") if isinstance(b, fx.Node) else None
        if found is None or bias_val is None or bias_val.dim() != 1:
            return None
        return LinearSite(node, "addmm", x, found[0], found[1], b, found[2])
    if t in _MM or t in _MATMUL or (node.op == "call_method" and node.target in ("matmul", "mm")) \
            or (node.op == "call_method" and node.target == "__matmul__"):
        if len(args) != 2 or kwargs:
            return None
        x, r = args
        xv = x.meta.get("example_value") if isinstance(x, fx.Node) else None
        if xv is None or xv.dim() < 2:
            return None
        found = _weight_operand(state, r)
        if found is None:
            return None
        return LinearSite(node, "mm" if t in _MM else "matmul", x, found[0], found[1], None, found[2])
    return None


@compile_pass(reads=("gm", "example_inputs"),
              writes=("sites", "site.node", "site.form", "site.x", "site.weight_node", "site.weight",
                      "site.bias_node", "site.transposed"))
def find_linear_sites(state: CompileState) -> None:
    for node in state.gm.graph.nodes:
        if node.op in ("call_function", "call_method"):
            s = _site(node, state)
            if s is not None:
                state.sites.append(s)
