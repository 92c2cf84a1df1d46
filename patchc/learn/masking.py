"""Differentiable tile masks over frozen weights, and the forward wrappers that use them.

The mask of a weight is M = M_tile + (1 − M_tile) ⊙ M_2:4.  Per tile one logit s; its relaxed
choice is a two-way Gumbel-softmax, which for two classes [κ·s, 0] is the binary concrete
z = σ((κ·s + L)/τ) with L ~ Logistic(0, 1) (the difference of two Gumbels).  Then
W ⊙ M = lerp(W ⊙ M_2:4, W, z): one fused op, and W ⊙ M_2:4 is a fixed buffer in tile mode.
In joint mode every group of 4 along K has 6 logits, one per pattern keeping 2 of 4
(MaskLLM), stored [6, N, K/4]; M_2:4 = Σ_p softmax_p((κ·p + G)/τ)·PATTERNS[p], G Gumbel noise.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..modules import oriented_weight
from ..types import TileMask, grid_of, sparse_allowed
from ..prune import tile_sizes

# the 6 ways to keep 2 of 4, as rows of keep flags
PATTERNS = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0], [0, 1, 0, 1], [0, 0, 1, 1]],
                        dtype=torch.float32)
_CODE_TO_PATTERN = torch.full((16,), -1, dtype=torch.long)
_CODE_TO_PATTERN[(PATTERNS * torch.tensor([8.0, 4, 2, 1])).sum(1).long()] = torch.arange(6)
_EPS = 1e-6
# relaxed mask values below this are set to 0 in the forward pass.  Late in the schedule (τ → 0.05)
# saturated sigmoids and softmaxes give values ~1e-40, W ⊙ M then holds subnormal floats, and CPU
# GEMMs on subnormal operands run ~160× slower (576×1536 fp32 weight, 30 % subnormal: 286 ms vs
# 1.7 ms; torch.set_flush_denormal does not reach the BLAS worker threads).  The value moves by
# < 1e-20·|W|, and the gradient lost is that of a sigmoid / softmax at < 1e-20: nothing.
_FLOOR = 1e-20


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
    out = torch.ones(n, k, dtype=torch.bool, device=idx.device)
    out[:, : k // 4 * 4] = PATTERNS.to(idx.device)[idx].bool().reshape(n, -1)
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
        gy = (PATTERNS * ctx.alpha).to(y.device, y.dtype).mm(grad.reshape(n * g, 4).t()).view(6, n, g)
        return torch._softmax_backward_data(gy, y, 0, y.dtype), None, None


class LayerMask:
    """Learnable mask state of one linear: tile logits [nN, nK] (and pattern logits [6, N, K/4])."""

    def __init__(self, name: str, module: nn.Module, tile, mode: str, mask24: torch.Tensor,
                 tile_logits: torch.Tensor, pattern_logits: torch.Tensor | None = None):
        self.name, self.module, self.tile, self.mode = name, module, tuple(tile), mode
        w = oriented_weight(module).detach()
        self.w = w if w.is_contiguous() else w.contiguous()  # Conv1D stores (in, out)
        self.shape = (n, k) = tuple(self.w.shape)
        dev, dt = self.w.device, self.w.dtype
        self.mask24 = mask24.to(dev, torch.bool)
        self.allowed = sparse_allowed(self.tile, self.shape).to(dev)
        self.sizes = tile_sizes(self.shape, self.tile).to(dev, torch.float32)
        self.tile_logits = nn.Parameter(tile_logits.to(dev, torch.float32).clone())
        nN, nK = grid_of(self.shape, self.tile)
        self.divisible = n % self.tile[0] == 0 and k % self.tile[1] == 0
        if not self.divisible:
            # one-hot row/column maps: z_exp = rows @ z @ cols is two skinny matmuls forward and
            # backward, 3× faster than repeat_interleave (whose backward scatters) on SmolLM2's
            # ragged 576/1536-wide weights
            self.rows = F.one_hot(torch.arange(n, device=dev) // self.tile[0], nN).to(dt)
            self.cols = F.one_hot(torch.arange(k, device=dev) // self.tile[1], nK).to(dt).t().contiguous()
        self.pattern_logits = None
        if mode == "joint":
            # [6, N, K/4]: the softmax runs over the leading dim of contiguous planes, 18× faster
            # on CPU than over a trailing dim of size 6
            self.pattern_logits = nn.Parameter(pattern_logits.to(dev, torch.float32).contiguous().clone())
        else:
            self.w24 = self.w * self.mask24.to(dt)
            n24 = self._per_tile(self.w24.float() ** 2)
            self.tile_norms = (n24, self._per_tile(self.w.float() ** 2) - n24)  # ‖W⊙M24‖², ‖W⊙(1−M24)‖²
        self.w_sq = float((self.w.float() ** 2).sum())
        self.current: torch.Tensor | None = None   # the masked weight of this step
        self.enabled = True

    @property
    def params(self) -> list[nn.Parameter]:
        return [self.tile_logits] + ([self.pattern_logits] if self.pattern_logits is not None else [])

    def _per_tile(self, x: torch.Tensor) -> torch.Tensor:
        (n, k), (tn, tk) = self.shape, self.tile
        nN, nK = grid_of(self.shape, self.tile)
        pad = x.new_zeros(nN * tn, nK * tk)
        pad[:n, :k] = x
        return pad.view(nN, tn, nK, tk).sum((1, 3))

    def _lerp_tiles(self, lo: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """lo + z_tile ⊙ (W − lo): z broadcast over its tiles (a view when the grid divides W)."""
        (n, k), (tn, tk) = self.shape, self.tile
        z = z.to(self.w.dtype)
        if self.divisible:
            v = (n // tn, tn, k // tk, tk)
            return torch.lerp(lo.view(v), self.w.view(v), z[:, None, :, None]).view(n, k)
        return torch.lerp(lo, self.w, self.rows @ z @ self.cols)

    def sample(self, sched: dict, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw this step's relaxed mask; store the masked weight in ``self.current``.
        Returns (soft pruned-weight count, ‖W ⊙ M‖²), both differentiable."""
        dev, tau = self.w.device, sched["tau"]
        u = torch.rand(self.tile_logits.shape, generator=gen, device=dev).clamp_(_EPS, 1 - _EPS)
        z = torch.sigmoid((sched["kappa_tile"] * self.tile_logits + (u.log() - (-u).log1p())) / tau)
        z = torch.where(self.allowed, z.masked_fill(z < _FLOOR, 0), torch.ones_like(z))  # ragged edge tiles stay dense
        pruned = (self.sizes * (1 - z)).sum() * 0.5                   # a 2:4 tile prunes half
        if self.mode == "tile":
            self.current = self._lerp_tiles(self.w24, z)
            n24, nr = self.tile_norms
            mag = (n24 + z * z * nr).sum()                             # W⊙M24 and W⊙(1−M24) are disjoint
        else:
            n, k = self.shape
            # Gumbel(0, 1)/τ = −log(−log U)/τ, in place: uniform_ + log_ + neg_ + xlogy (torch's
            # exponential_ alone cost 3× uniform_ + log_ on CPU); U in [1e-6, 1 − 1e-6] cuts the
            # noise to [−2.6, 13.8]
            u = torch.empty(self.pattern_logits.shape, device=dev).uniform_(_EPS, 1 - _EPS, generator=gen)
            g = torch.xlogy(-1 / tau, u.log_().neg_(), out=u)
            m = _PatternMask.apply(self.pattern_logits, g, sched["kappa_24"] / tau)
            if m.shape[1] < k:                                          # a partial last group is kept
                m = torch.cat([m, m.new_ones(n, k - m.shape[1])], 1)
            self.current = self._lerp_tiles(self.w * m.to(self.w.dtype), z)
            mag = torch.linalg.vector_norm(self.current, dtype=torch.float32) ** 2
        return pruned, mag

    # ---- hard decisions ----------------------------------------------------------------------
    def hard_mask24(self) -> torch.Tensor:
        if self.mode == "tile":
            return self.mask24.cpu()
        return patterns_to_mask(self.pattern_logits.detach().argmax(0), self.shape[1]).cpu()

    def to_tilemask(self, kinds: torch.Tensor) -> TileMask:
        return TileMask.from_kinds(self.tile, kinds, self.hard_mask24())


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


def install(layers: list[LayerMask]) -> list:
    """Route each layer's forward through its current masked weight (or W when disabled)."""
    def fn(layer):
        def weight():
            if not layer.enabled:
                return layer.w
            if layer.current is None:
                raise RuntimeError(f"{layer.name}: no mask sampled for this step")
            return layer.current
        return weight
    return [_patch_forward(layer.module, fn(layer)) for layer in layers]


def uninstall(layers: list[LayerMask], saved: list) -> None:
    for layer, s in zip(layers, saved):
        _restore_forward(layer.module, s)
        layer.current = None


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
            mask = m.mask.to(oriented_weight(mod).device)
            saved.append((mod, _patch_forward(mod, lambda mod=mod, mask=mask:
                                              oriented_weight(mod) * mask.to(oriented_weight(mod).dtype))))
        yield model
    finally:
        for mod, s in saved:
            _restore_forward(mod, s)
