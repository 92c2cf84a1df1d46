"""Differentiable tile masks over frozen weights, and the forward wrappers that use them.

The mask of a weight is M = M_tile + (1 − M_tile) ⊙ M_2:4.  Per tile one logit s; its relaxed
choice is a two-way Gumbel-softmax, which for two classes [κ·s, 0] is the binary concrete
z = σ((κ·s + L)/τ) with L ~ Logistic(0, 1) (the difference of two Gumbels).  Then
W ⊙ M = lerp(W ⊙ M_2:4, W, z): one fused op.
In joint mode every group of 4 along K has 6 logits, one per pattern keeping 2 of 4
(MaskLLM), stored [6, N, K/4]; M_2:4 = Σ_p softmax_p((κ·p + G)/τ)·PATTERNS[p], G Gumbel noise.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..modules import oriented_weight

# the 6 ways to keep 2 of 4, as rows of keep flags
PATTERNS = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0], [0, 1, 0, 1], [0, 0, 1, 1]],
                        dtype=torch.float32)
_PATTERNS_BOOL = PATTERNS.bool()
_CODE_TO_PATTERN = torch.full((16,), -1, dtype=torch.long)
_CODE_TO_PATTERN[(PATTERNS * torch.tensor([8.0, 4, 2, 1])).sum(1).long()] = torch.arange(6)
_EPS = 1e-6
# relaxed mask values below this are set to 0 in the forward pass.  Late in the schedule (τ → 0.05)
# saturated sigmoids and softmaxes give values ~1e-40, W ⊙ M then holds subnormal floats, and CPU
# GEMMs on subnormal operands run ~160× slower (576×1536 fp32 weight, 30 % subnormal: 286 ms vs
# 1.7 ms; torch.set_flush_denormal does not reach the BLAS worker threads).  The value moves by
# < 1e-20·|W|, and the gradient lost is that of a sigmoid / softmax at < 1e-20: nothing.
_FLOOR = 1e-20
# elements of the 2:4 softmax handled at once in its backward (2^18 floats: 1 MiB)
_BACKWARD_CHUNK = 1 << 18


def pattern_index(mask24: torch.Tensor) -> torch.Tensor:
    """long [N, K//4]: which of the 6 patterns each complete group of a 2:4 mask uses."""
    n, k = mask24.shape
    g = mask24[:, : k // 4 * 4].reshape(n, k // 4, 4).long()
    idx = _CODE_TO_PATTERN.to(g.device)[(g * torch.tensor([8, 4, 2, 1], device=g.device)).sum(-1)]
    if (idx < 0).any():
        raise ValueError("pattern_index: the mask has a group that does not keep exactly 2 of 4")
    return idx


def patterns_to_mask(idx: torch.Tensor, k: int) -> torch.Tensor:
    """bool [N, K] from pattern indices [N, K//4]; a partial last group is kept whole."""
    n = idx.shape[0]
    m = _PATTERNS_BOOL.to(idx.device)[idx.int()].reshape(n, -1)       # one gather of bools
    if m.shape[1] == k:
        return m
    out = torch.ones(n, k, dtype=torch.bool, device=idx.device)
    out[:, : m.shape[1]] = m
    return out


class _PatternMask(torch.autograd.Function):
    """M_2:4 [N, 4·G] = Σ_p softmax_p(noise + α·logits)·PATTERNS[p] over logits [6, N, G].

    The same values as softmax + einsum under autograd (to float rounding; values below
    ``_FLOOR`` are 0), in fewer passes:
    the noise buffer takes the logits in place, the pattern sums are one (N·G, 6) @ (6, 4) matmul
    each way, and α rides on the backward matmul.  28 % faster forward + backward than the
    autograd graph on a 1536×576 weight (CPU)."""

    @staticmethod
    def forward(ctx, logits, noise, alpha):
        y = torch.softmax(noise.add_(logits, alpha=alpha), 0)     # noise is consumed
        _, n, g = y.shape
        ctx.save_for_backward(y)
        ctx.alpha = alpha
        m = y.view(6, -1).t().mm(PATTERNS.to(y.device, y.dtype)).view(n, 4 * g)
        return m.masked_fill_(m < _FLOOR, 0)           # no subnormal W ⊙ M (see _FLOOR)

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        _, n, g = y.shape
        p = (PATTERNS * ctx.alpha).to(y.device, y.dtype)
        grad = grad.reshape(n, 4 * g)
        out = torch.empty_like(y)
        # a few rows at a time (the same values: each group's softmax backward is its own), so
        # the [6, N, K/4] pattern gradient is the only full-size temporary; also faster than one
        # call (SmolLM2-135M's 210 layers: 0.29 s vs 0.35 s per step, CPU, cache-sized pieces)
        rows = max(1, _BACKWARD_CHUNK // (6 * g))
        for r0 in range(0, n, rows):
            gy = p.mm(grad[r0:r0 + rows].reshape(-1, 4).t()).view(6, -1, g)
            out[:, r0:r0 + rows] = torch._softmax_backward_data(gy, y[:, r0:r0 + rows].contiguous(), 0, y.dtype)
        return out, None, None


def lerp_tiles(lo: torch.Tensor, w: torch.Tensor, z: torch.Tensor, tile, maps=None) -> torch.Tensor:
    """lo + z_tile ⊙ (W − lo): the tile gate z [nN, nK] broadcast over its tiles (a view when the
    grid divides W, else through the one-hot row / column ``maps`` (rows [N, nN], cols [nK, K]))."""
    (n, k), (tn, tk) = tuple(w.shape), tile
    z = z.to(w.dtype)
    if maps is None:
        v = (n // tn, tn, k // tk, tk)
        return torch.lerp(lo.view(v), w.view(v), z[:, None, :, None]).view(n, k)
    rows, cols = maps
    return torch.lerp(lo, w, rows @ z @ cols)


class _MaskedLinear(torch.autograd.Function):
    """``F.linear(x, W ⊙ M, b)`` that keeps nothing of the mask for backward but the inputs:
    ``state.masked_weight`` builds W ⊙ M in forward (under no_grad) and again in backward (with
    autograd, from the logits as leaves) — in tile mode one pass over W; in joint mode the 2:4
    softmax from the redrawn Gumbel noise — so a step holds one layer's mask at a time.  The
    gradients are those of the autograd graph ``F.linear(x, masked_weight(...), b)`` (the same
    matmuls: ``g·W`` for x, ``gᵀ·x`` for W ⊙ M).  Returns (y, ‖W ⊙ M‖² in joint mode else 0)."""

    @staticmethod
    def forward(ctx, x, w, bias, z, pattern_logits, state, gen):
        with torch.no_grad():
            wm = state.masked_weight(w, z, pattern_logits, gen)
            out = F.linear(x, wm, bias)
            mag = (torch.linalg.vector_norm(wm, dtype=torch.float32) ** 2 if pattern_logits is not None
                   else out.new_zeros((), dtype=torch.float32))
        ctx.state = state
        ctx.save_for_backward(x, w, z, pattern_logits)
        if pattern_logits is None:
            ctx.mark_non_differentiable(mag)
        return out, mag

    @staticmethod
    def backward(ctx, g_out, g_mag):
        x, w, z, pattern_logits = ctx.saved_tensors
        z = z.detach().requires_grad_()
        p = None if pattern_logits is None else pattern_logits.detach().requires_grad_()
        with torch.enable_grad():
            wm = ctx.state.masked_weight(w, z, p, None if p is None else ctx.state.replay())
            g2 = g_out.reshape(-1, g_out.shape[-1])
            gx = g2.mm(wm.detach()).view(x.shape) if ctx.needs_input_grad[0] else None
            outs, grads = [wm], [g2.t().mm(x.reshape(-1, x.shape[-1]))]
            if p is not None:
                outs.append(torch.linalg.vector_norm(wm, dtype=torch.float32) ** 2)
                grads.append(g_mag)
            torch.autograd.backward(outs, grads, inputs=[z] if p is None else [z, p])
        return gx, None, None, z.grad, None if p is None else p.grad, None, None


def _patch_forward(module: nn.Module, weight_fn):
    """Replace ``module.forward`` by F.linear with the weight ``weight_fn()`` gives; returns
    what ``_restore_forward`` needs to put the module back exactly as it was."""
    saved = module.__dict__.get("forward", None)

    def forward(x):
        return F.linear(x, weight_fn(), module.bias)

    module.forward = forward
    return saved


def _restore_forward(module: nn.Module, saved) -> None:
    if saved is None:
        module.__dict__.pop("forward", None)
    else:
        module.forward = saved


def _times(w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return w * mask.to(w.device, w.dtype)      # a no-op move unless the module went to another device


@contextlib.contextmanager
def masked_forward(model: nn.Module, plan):
    """Run ``model`` with the plan's hard masks applied on the fly (weights untouched):
    ``F.linear(x, W ⊙ M, b)`` for every planned linear; restored on exit."""
    plan.validate_against(model)
    mods = dict(model.named_modules())
    saved = []
    try:
        for name, m in plan.items():
            mod = mods[name]
            saved.append((mod, _patch_forward(mod, lambda mod=mod, mask=m.mask: _times(oriented_weight(mod), mask))))
        yield model
    finally:
        for mod, s in saved:
            _restore_forward(mod, s)
