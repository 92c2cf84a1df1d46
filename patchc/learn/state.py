"""The learning state of one masked linear, owned by that linear.

:class:`MaskState` is an ``nn.Module`` attached to each planned linear as its child
``patch_mask``: the tile logits [nN, nK] (and, joint mode, the pattern logits [6, N, K/4]) are its
parameters, so FSDP2 shards them with the decoder block that holds the linear, and
``torch.distributed.checkpoint`` finds them under the linear's name.  The linear's forward is
routed through :meth:`MaskState.linear`, which draws the step's relaxed mask *inside* that forward:
the mask is built, used and freed one layer at a time, and a checkpointed block rebuilds it in
backward.  Every draw of a step comes from one generator, in the order the layers run; a layer
keeps the generator state its draws started from, so a second forward of the same step (an
activation-checkpointing recompute, the next micro-batch, a backward rebuild) sees the same mask.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..modules import oriented_weight
from ..prune import tile_sizes
from ..types import TileMask, grid_of, sparse_allowed
from . import masking
from .masking import _EPS, _MaskedLinear, _PatternMask, lerp_tiles, patterns_to_mask

CHILD = "patch_mask"


class StepContext:
    """What every :class:`MaskState` of a run reads during a step (one object, shared).

    ``sched``: τ, κ of the step; ``gen``: the generator of all Gumbel noise; ``collect``: append
    each layer's (soft pruned count, ‖W ⊙ M‖²) to ``stats`` (on in the forward whose loss is
    taken, off in backward recomputes); ``masks_on``: off to run the dense model (distillation's
    teacher); ``recompute``: joint mode rebuilds each mask in its backward."""

    def __init__(self, gen: torch.Generator, recompute: bool = False):
        self.gen, self.recompute = gen, recompute
        self.sched: dict = {}
        self.collect, self.masks_on = False, True
        self.stats: list[tuple[torch.Tensor, torch.Tensor]] = []


class MaskState(nn.Module):
    """Learnable mask of one linear: tile logits (and joint pattern logits) plus the fixed facts
    of its weight (tile sizes, which tiles may be 2:4, the tile prior's 2:4 patterns).

    ``pattern24``: uint8 [N, K//4], the index of the fixed 2:4 pattern of every group (tile mode).
    ``state_dtype``: dtype of the logits; the mask itself is always computed in float32.
    ``keep_w24``: tile mode keeps W ⊙ M_2:4 (the weight's bytes again, a frozen parameter that
    FSDP shards) instead of rebuilding it from the patterns in every forward and backward."""

    def __init__(self, name: str, module: nn.Module, tile, mode: str, tile_logits: torch.Tensor,
                 pattern_logits: Optional[torch.Tensor] = None, pattern24: Optional[torch.Tensor] = None,
                 state_dtype: torch.dtype = torch.float32, keep_w24: bool = True):
        super().__init__()
        self.name, self.tile, self.mode = name, tuple(tile), mode
        w = oriented_weight(module).detach()
        self.shape = (n, k) = tuple(w.shape)
        self.grid = grid_of(self.shape, self.tile)
        dev, dt = w.device, w.dtype
        self.tile_logits = nn.Parameter(tile_logits.to(dev, state_dtype).clone())
        self.register_parameter("w24", None)
        if mode == "joint":
            # [6, N, K/4]: the softmax runs over the leading dim of contiguous planes, 18× faster
            # on CPU than over a trailing dim of size 6
            self.pattern_logits = nn.Parameter(pattern_logits.to(dev, state_dtype).contiguous().clone())
            self.register_parameter("pattern24", None)
        else:
            self.register_parameter("pattern_logits", None)
            self.pattern24 = nn.Parameter(pattern24.to(dev, torch.uint8).contiguous().clone(), requires_grad=False)
            w24 = w * self.mask24().to(dt)
            if keep_w24:
                self.w24 = nn.Parameter(w24, requires_grad=False)
        self.register_buffer("allowed", sparse_allowed(self.tile, self.shape).to(dev), persistent=False)
        self.register_buffer("sizes", tile_sizes(self.shape, self.tile).to(dev, torch.float32), persistent=False)
        nN, nK = self.grid
        self.divisible = n % self.tile[0] == 0 and k % self.tile[1] == 0
        if not self.divisible:
            # one-hot row/column maps: z_exp = rows @ z @ cols is two skinny matmuls forward and
            # backward, 3× faster than repeat_interleave (whose backward scatters) on SmolLM2's
            # ragged 576/1536-wide weights
            self.register_buffer("rows", F.one_hot(torch.arange(n, device=dev) // self.tile[0], nN).to(dt),
                                 persistent=False)
            self.register_buffer("cols", F.one_hot(torch.arange(k, device=dev) // self.tile[1], nK).to(dt)
                                 .t().contiguous(), persistent=False)
        if mode == "tile":
            n24 = self._per_tile(w24.float() ** 2)
            del w24
            # ‖W⊙M24‖² and ‖W⊙(1−M24)‖² per tile: the tile mode's ‖W ⊙ M‖² in closed form
            self.register_buffer("n24", n24, persistent=False)
            self.register_buffer("nr", self._per_tile(w.float() ** 2) - n24, persistent=False)
        self.w_sq = float((w.float() ** 2).sum())
        self.penalty_weight = 1.0        # LearnConfig.density_weights[name]
        self.ctx: Optional[StepContext] = None
        self._rng: Optional[torch.Tensor] = None       # generator state this step's draws started from

    # ---- facts ---------------------------------------------------------------------------------
    @property
    def maps(self):
        return None if self.divisible else (self.rows, self.cols)

    def mask24(self, idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        """bool [N, K] of the fixed 2:4 patterns (tile mode) or of ``idx``."""
        return patterns_to_mask((self.pattern24 if idx is None else idx).long(), self.shape[1])

    def _per_tile(self, x: torch.Tensor) -> torch.Tensor:
        (n, k), (tn, tk) = self.shape, self.tile
        nN, nK = self.grid
        pad = x.new_zeros(nN * tn, nK * tk)
        pad[:n, :k] = x
        return pad.view(nN, tn, nK, tk).sum((1, 3))

    # ---- the step's draws ----------------------------------------------------------------------
    def begin_step(self) -> None:
        self._rng = None

    def _generator(self) -> torch.Generator:
        """The run's generator the first time this layer draws in a step, else a replay of it."""
        if self._rng is None:
            self._rng = self.ctx.gen.get_state()
            return self.ctx.gen
        return self.replay(gate=False)

    def replay(self, gate: bool = True) -> torch.Generator:
        """A generator at this step's first draw of this layer (past the tile gate's with ``gate``)."""
        g = torch.Generator(device=self.ctx.gen.device)
        g.set_state(self._rng)
        if gate:
            torch.rand(self.grid, generator=g, device=g.device)
        return g

    def gate(self, gen: torch.Generator) -> torch.Tensor:
        """The relaxed tile choice z [nN, nK] (1 = dense): binary concrete of the tile logits."""
        sched = self.ctx.sched
        u = torch.rand(self.grid, generator=gen, device=gen.device).clamp_(_EPS, 1 - _EPS)
        z = torch.sigmoid((sched["kappa_tile"] * self.tile_logits.float() + (u.log() - (-u).log1p())) / sched["tau"])
        return torch.where(self.allowed, z.masked_fill(z < masking._FLOOR, 0), torch.ones_like(z))  # ragged edge tiles stay dense

    def masked_weight(self, w: torch.Tensor, z: torch.Tensor, pattern_logits: Optional[torch.Tensor],
                      gen: Optional[torch.Generator]) -> torch.Tensor:
        """W ⊙ M = lerp(W ⊙ M_2:4, W, z) for this step (joint: draws the 2:4 noise from ``gen``)."""
        if self.mode == "tile":
            lo = self.w24 if self.w24 is not None else w * self.mask24().to(w.dtype)
        else:
            n, k = self.shape
            tau = self.ctx.sched["tau"]
            # Gumbel(0, 1)/τ = −log(−log U)/τ, in place: uniform_ + log_ + neg_ + xlogy (torch's
            # exponential_ alone cost 3× uniform_ + log_ on CPU); U in [1e-6, 1 − 1e-6] cuts the
            # noise to [−2.6, 13.8]
            u = torch.empty(pattern_logits.shape, device=gen.device).uniform_(_EPS, 1 - _EPS, generator=gen)
            g = torch.xlogy(-1 / tau, u.log_().neg_(), out=u)
            m = _PatternMask.apply(pattern_logits.float(), g, self.ctx.sched["kappa_24"] / tau)
            if m.shape[1] < k:                                          # a partial last group is kept
                m = torch.cat([m, m.new_ones(n, k - m.shape[1])], 1)
            lo = w * m.to(w.dtype)
        return lerp_tiles(lo, w, z, self.tile, self.maps)

    def linear(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The forward of the masked linear: ``F.linear(x, W ⊙ M, b)`` with this step's mask."""
        w = oriented_weight(module)
        w = w if w.is_contiguous() else w.contiguous()          # Conv1D stores (in, out)
        ctx = self.ctx
        if ctx is None or not ctx.masks_on:
            return F.linear(x, w, module.bias)
        gen = self._generator()
        z = self.gate(gen)
        pruned = (self.sizes * (1 - z)).sum() * 0.5                  # a 2:4 tile prunes half
        if self.mode == "joint" and not ctx.recompute:
            wm = self.masked_weight(w, z, self.pattern_logits, gen)
            out = F.linear(x, wm, module.bias)
            mag = torch.linalg.vector_norm(wm, dtype=torch.float32) ** 2
        else:
            out, mag = _MaskedLinear.apply(x, w, module.bias, z, self.pattern_logits, self, gen)
            if self.mode == "tile":
                mag = (self.n24 + z * z * self.nr).sum()              # W⊙M24 and W⊙(1−M24) are disjoint
        if ctx.collect:
            ctx.stats.append((pruned, mag, pruned * self.penalty_weight))
        return out

    # ---- hard decisions ------------------------------------------------------------------------
    def hard_mask24(self, full) -> torch.Tensor:
        """bool [N, K] on the CPU: the fixed patterns, or the argmax of the pattern logits.
        ``full(t)`` gives a parameter's whole tensor (an all-gather when it is sharded)."""
        if self.mode == "tile":
            return self.mask24(full(self.pattern24)).cpu()
        return patterns_to_mask(full(self.pattern_logits).argmax(0), self.shape[1]).cpu()

    def to_tilemask(self, kinds: torch.Tensor, full) -> TileMask:
        return TileMask.from_kinds(self.tile, kinds, self.hard_mask24(full))


def attach(mods: dict[str, nn.Module], states: dict[str, MaskState], ctx: StepContext) -> list:
    """Make each state the child ``patch_mask`` of its linear and route the linear's forward
    through it; returns what :func:`detach` needs to put the modules back exactly."""
    saved = []
    try:
        for name, mod in mods.items():
            if hasattr(mod, CHILD):
                raise ValueError(f"{name}: the module already has an attribute {CHILD!r}")
            state = states[name]
            state.ctx = ctx
            mod.add_module(CHILD, state)
            saved.append((mod, mod.__dict__.get("forward")))
            mod.forward = lambda x, _s=state, _m=mod: _s.linear(_m, x)
    except BaseException:
        detach(saved)
        raise
    return saved


def detach(saved: list) -> None:
    for mod, fwd in saved:
        state = mod._modules.pop(CHILD, None)
        if state is not None:
            state.ctx = None
        if fwd is None:
            mod.__dict__.pop("forward", None)
        else:
            mod.forward = fwd
