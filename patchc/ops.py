"""The ``patchc::`` custom ops the rewritten graphs call.

* ``hybrid_linear(x, weights, biases, site_id)``: y = x · [W₁ ⊙ M₁; …]ᵀ + [b₁; …] for one linear
  or fused siblings (the graph narrows y back per member).  The op finds its entry by
  ``site_id`` (inductor rejects ``get_attr`` constants in a backend's graph); the weights are
  passed so the entry notices an in-place change (``_version``) instead of computing with stale
  data.  ``biases``: the members' biases that exist, in member order.
* ``masked_weight(weight, site_id, member)``: W ⊙ M of one member (from the packed form once its
  dense weight is released); the masked fallback of a site computes ``F.linear(x,
  masked_weight(W))``, so gradients reach W through it.
* ``apply_mask(t, site_id, member)``: t ⊙ M, the backward of ``masked_weight``.

Backward formulas are built from these ops only, never from tensors made inside the formula, so
AOTAutograd can trace them under fake tensors (``inner="inductor"`` with grad mode on).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .stats import counters
from .maskops import apply_mask as _apply_mask
from .runtime import get_entry


@torch.library.custom_op("patchc::hybrid_linear", mutates_args=())
def hybrid_linear(x: Tensor, weights: list[Tensor], biases: list[Tensor], site_id: int) -> Tensor:
    """y = x · (W ⊙ M)ᵀ + b over the entry's members, computed on the path ``choose_path`` picks."""
    return get_entry(site_id).run(x, weights, biases)


@hybrid_linear.register_fake
def _hybrid_fake(x, weights, biases, site_id):
    return x.new_empty((*x.shape[:-1], get_entry(site_id).tile_mask.shape[0]))


def _hybrid_setup(ctx, inputs, output):
    x, weights, biases, site_id = inputs
    ctx.site_id, ctx.n_biases = site_id, len(biases)
    ctx.save_for_backward(*weights)


def _hybrid_backward(ctx, grad):
    e = get_entry(ctx.site_id)
    ws = ctx.saved_tensors
    gx, gb, off = None, [], 0
    for i, (m, w) in enumerate(zip(e.members, ws)):
        g = grad[..., off:off + m.n]
        mw = torch.ops.patchc.masked_weight(w, ctx.site_id, i).to(grad.dtype)
        part = g @ (mw.t() if m.transposed else mw)
        gx = part if gx is None else gx + part
        if m.has_bias:
            gb.append(g.reshape(-1, m.n).sum(0))
        off += m.n
    # the weights of a hybrid site never receive gradients (the compile sends those sites to the
    # masked fallback), so their gradient is None
    return gx, [None] * len(ws), gb, None


hybrid_linear.register_autograd(_hybrid_backward, setup_context=_hybrid_setup)


@torch.library.custom_op("patchc::masked_weight", mutates_args=())
def masked_weight(weight: Tensor, site_id: int, member: int) -> Tensor:
    """W ⊙ M of member ``member`` of entry ``site_id``, in the weight's stored orientation."""
    counters["masked_weight_calls"] += 1
    return get_entry(site_id).member_weight(member, weight)


@masked_weight.register_fake
def _masked_weight_fake(weight, site_id, member):
    return torch.empty_like(weight)


def _mask_setup(ctx, inputs, output):
    ctx.site_id, ctx.member = inputs[1], inputs[2]


def _mask_backward(ctx, grad):
    """d(W ⊙ M)/dW applied to ``grad``: grad ⊙ M (the backward of both ``masked_weight`` and
    ``apply_mask``)."""
    return torch.ops.patchc.apply_mask(grad, ctx.site_id, ctx.member), None, None


masked_weight.register_autograd(_mask_backward, setup_context=_mask_setup)


@torch.library.custom_op("patchc::apply_mask", mutates_args=())
def apply_mask(t: Tensor, site_id: int, member: int) -> Tensor:
    """t ⊙ M with member ``member``'s mask of entry ``site_id`` (t in the weight's orientation)."""
    m = get_entry(site_id).members[member]
    return _apply_mask(t, m.tile_mask, m.transposed)


@apply_mask.register_fake
def _apply_mask_fake(t, site_id, member):
    return torch.empty_like(t)


apply_mask.register_autograd(_mask_backward, setup_context=_mask_setup)
