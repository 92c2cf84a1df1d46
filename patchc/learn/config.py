"""``LearnConfig``: every option of mask learning, validated when built; linear schedules."""
from __future__ import annotations

from dataclasses import asdict, dataclass
import math
import os
from typing import Mapping, Optional, Sequence

import torch

from ..dtypes import parse_dtype
from ..prune import check_target
from ..types import _check_tile

MODES = ("tile", "joint")
PRIORS = ("magnitude", "wanda", "sparsegpt")
LOSSES = ("lm", "distill")
STRATEGIES = ("auto", "ddp", "fsdp")
STATE_DTYPES = ("float32", "bfloat16")
# strategy="auto" shards with FSDP2 from this many model parameters on (about 1 B: the joint mode's
# 18 B of learning state per weight then passes 18 GB per rank unsharded)
FSDP_AUTO_PARAMS = 1_000_000_000
# The paper's schedules: tile logit scale kappa for PATCH-Joint / PATCH-Tile.
DEFAULT_KAPPA_TILE = {"joint": (25.0, 350.0), "tile": (100.0, 500.0)}


def _pair(name: str, value) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in value)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"LearnConfig.{name} must be a (start, end) pair of numbers, got {value!r}") from exc
    if a <= 0 or b <= 0:
        raise ValueError(f"LearnConfig.{name} values must be positive, got {value!r}")
    return a, b


@dataclass
class LearnConfig:
    """Options of :func:`patchc.learn_masks` (PATCH-Tile / PATCH-Joint).

    mode: ``"tile"`` (2:4 pattern fixed by the one-shot ``prior``) or ``"joint"`` (the 2:4
        pattern of every group of 4 is learned too, MaskLLM-style, among its 6 choices).
    target_sparsity: global pruned fraction of the planned weights, in [0, 0.5]; the extracted
        hard plan reaches it with the fewest 2:4 tiles (at most +0.5 %, or what the tile grid
        allows, with a warning).
    tile: (rows, cols) of a tile over the (out, in) weight; cols must be a multiple of 4.
    prior: one-shot method that initialises the logits (``magnitude``, ``wanda``, ``sparsegpt``).
    prior_sparsity: sparsity of the unstructured one-shot pruning whose per-tile density is the
        tile prior (0.5: the density a 2:4 tile would have).
    prior_strength: logit gap at step 0, in units of the Gumbel noise scale (the tile logits, and
        the 2:4 pattern logits unless ``prior_strength_24`` is given).
    prior_strength_24: step-0 gap of the prior's 2:4 pattern over the other five (joint mode);
        ``None`` = ``prior_strength``.  A larger gap keeps more of the one-shot patterns: on
        SmolLM2-135M (joint 25 %, 240 steps) 3.3 % of the weight positions in 2:4 tiles leave
        Wanda's pattern at 3, 0.9 % at 4, 0.3 % at 5, none at 8; at 4 the plan is better on every
        held-out text, most out of domain (bench/results/quality/NOTES.md, "Prior strength").
    calib_batches: how many of the batches the prior (wanda / sparsegpt) is computed on.
    steps, lr: optimisation steps and Adam learning rate of the tile logits.
    lr_24: Adam learning rate of the 2:4 pattern logits (joint mode); ``None`` = ``lr / 10``.
        Each Adam step moves a logit by up to ~lr·κ Gumbel units, so at κ_24 = 100 a rate of
        5e-3 wipes out a prior of strength 3 within ~6 steps and the patterns turn to noise
        (SmolLM2-135M, joint 45 %, 30 steps: perplexity 3404 at lr_24 = 5e-3 vs 136 at 5e-4);
        10× below ``lr`` keeps the one-shot pattern as the start and lets the data move it.
    tau: Gumbel-softmax temperature (start, end), moved linearly over the steps.
    kappa_tile: tile-logit scale (start, end); ``None`` = the paper's per-mode default.
    kappa_24: 2:4 pattern-logit scale (start, end) (joint mode).
    lambda1: weight of |soft density − target density| (global, parameter-weighted).
    density_weights: ``{fqn: weight}`` for every learned linear: each of its weights counts that
        much in the density penalty (then |weighted soft sparsity − target|, the weights' mean
        over all parameters being 1), so the penalty pushes tiles towards 2:4 where they pay.
        ``patchc.latency.density_weights`` gives the decode time a 2:4 tile saves by the cost
        model (``patchc learn --latency-aware``); ``None``: every weight counts the same (budget
        by count).  The extracted plan meets ``target_sparsity`` by count either way.
    lambda2: weight of the decaying magnitude term −λ2·(1 − t/T)·‖M⊙W‖/‖W‖.
    include, exclude: fnmatch patterns on module FQNs; default every linear of the decoder
        blocks (not the embeddings, not the LM head).
    seed: seeds the Gumbel noise; equal seeds give equal plans (also across a resume).
    device, dtype: where and in which precision the frozen weights live during learning (the
        model is moved there, like ``model.to``).  Under torchrun a CUDA device means the GPU of
        the process's ``LOCAL_RANK``.
    state_dtype: precision of the learning state, the logits and their Adam moments:
        ``"float32"`` (18 B per weight in joint mode) or ``"bfloat16"`` (9 B per weight; each
        layer's mask and Adam update are still computed in float32, the results rounded to bf16).
    grad_checkpointing: recompute each decoder block in backward (torch.utils.checkpoint) — its
        activations and the relaxed masks of its linears, which are built inside their forward —
        so one block's masks and activations are alive at a time instead of every block's.
    recompute_masks: rebuild each linear's relaxed mask in that linear's backward instead of
        keeping it: joint mode redraws the Gumbel noise from the saved generator state instead
        of keeping the 2:4 softmax (6 B per weight, every layer), for one more mask build per
        step; tile mode rebuilds W ⊙ M_2:4 from the fixed patterns (0.25 B per weight) in every
        forward and backward instead of keeping it (the weight's bytes again), for ~40 % more
        step time (SmolLM2-135M fp32, CPU).  One layer's mask is then alive at a time.
    strategy: with several ranks (torchrun): ``"ddp"`` keeps the whole model and learning state
        on every rank and averages the logit gradients; ``"fsdp"`` shards every decoder block
        with FSDP2 (``fully_shard``): frozen weights, logits, Adam states and gradients are split
        across the ranks; ``"auto"`` is fsdp from ~1 B model parameters on, ddp below.
    offload_optimizer: keep the Adam moments on the CPU and update there (with fsdp: FSDP2's
        ``CPUOffloadPolicy``, which keeps the parameter shards and gradients on the CPU too).
    batches_per_step: batches whose mean loss makes one step, split across the ranks (each runs
        its share and the gradients are accumulated); ``None`` = one batch per rank.  Step ``s``
        reads batches ``s·B … s·B+B−1`` (cycling), so a run gives the same plan on any number of
        ranks that divides ``B``.
    prior_sequential: calibrate the wanda / sparsegpt prior one decoder block at a time on the
        outputs of the blocks before it already pruned 2:4 (SparseGPT's own protocol); default:
        every block sees the dense model's activations.
    checkpoint_dir, checkpoint_every, resume: periodic sharded checkpoints written with
        ``torch.distributed.checkpoint`` as safetensors files (each rank writes its shards; no
        pickle) plus a JSON header; ``resume=True`` continues from the checkpoint in
        ``checkpoint_dir`` when there is one, on the same or another number of ranks.
    loss: ``"lm"`` (next-token cross-entropy) or ``"distill"`` (KL to the same model run with its
        masks switched off, under no_grad).
    pattern_plan: a plan file (``MaskPlan.save``; e.g. a learned 2:4 plan) whose 2:4 patterns
        replace the prior's: every group of 4 where the plan keeps exactly 2 takes the plan's
        pattern (the fixed patterns of tile mode, the starting patterns of joint mode); the
        other groups (the plan's dense tiles) keep the prior's, and the tile logits still start
        from the prior.  The plan must cover every learned linear with the same shape.
    hidden_distill: with ``loss="distill"``, weight of a term matching every decoder block's output
        to the dense model's: the mean over blocks and tokens of ‖h − h_dense‖² / ‖h_dense‖²
        (:func:`patchc.learn.losses.hidden_mismatch`); 0 (default): the KL alone.
    log_path: JSON-lines log, one record per step (default ``checkpoint_dir/learn_log.jsonl``).
    progress: show a tqdm bar (rank 0 only).
    """

    mode: str = "tile"
    target_sparsity: float = 0.35
    tile: Sequence[int] = (128, 128)
    prior: str = "magnitude"
    prior_sparsity: float = 0.5
    prior_strength: float = 3.0
    prior_strength_24: Optional[float] = None
    calib_batches: int = 16
    steps: int = 100
    lr: float = 5e-3
    lr_24: Optional[float] = None
    tau: Sequence[float] = (4.0, 0.05)
    kappa_tile: Optional[Sequence[float]] = None
    kappa_24: Sequence[float] = (100.0, 500.0)
    lambda1: float = 5.0
    lambda2: float = 0.1
    density_weights: Optional[Mapping[str, float]] = None
    include: Optional[Sequence[str]] = None
    exclude: Optional[Sequence[str]] = None
    seed: int = 0
    device: Optional[str] = None
    dtype: Optional[object] = None
    state_dtype: object = "float32"
    grad_checkpointing: bool = False
    recompute_masks: bool = False
    strategy: str = "auto"
    offload_optimizer: bool = False
    batches_per_step: Optional[int] = None
    prior_sequential: bool = False
    checkpoint_dir: Optional[str] = None
    checkpoint_every: int = 50
    resume: bool = False
    loss: str = "lm"
    hidden_distill: float = 0.0
    pattern_plan: Optional[str] = None
    log_path: Optional[str] = None
    progress: bool = True

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"LearnConfig.mode must be one of {MODES}, got {self.mode!r}")
        if self.prior not in PRIORS:
            raise ValueError(f"LearnConfig.prior must be one of {PRIORS}, got {self.prior!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"LearnConfig.loss must be one of {LOSSES}, got {self.loss!r}")
        h = self.hidden_distill
        if isinstance(h, bool) or not isinstance(h, (int, float)) or not math.isfinite(h) or h < 0:
            raise ValueError(f"LearnConfig.hidden_distill must be a finite number >= 0, got {h!r}")
        if h > 0 and self.loss != "distill":
            raise ValueError(f"LearnConfig.hidden_distill={h} needs loss='distill' (the dense model's block "
                             f"outputs are its targets), got loss={self.loss!r}")
        self.hidden_distill = float(h)
        if self.pattern_plan is not None:
            if not isinstance(self.pattern_plan, (str, os.PathLike)):
                raise ValueError(f"LearnConfig.pattern_plan must be the path of a plan file, got "
                                 f"{type(self.pattern_plan).__name__}")
            self.pattern_plan = os.fspath(self.pattern_plan)
            if not os.path.isfile(self.pattern_plan):
                raise FileNotFoundError(f"LearnConfig.pattern_plan: {self.pattern_plan} is not a file")
        self.target_sparsity = check_target(self.target_sparsity)
        self.tile = _check_tile(self.tile)
        if not 0.0 < float(self.prior_sparsity) < 1.0:
            raise ValueError(f"LearnConfig.prior_sparsity must be in (0, 1), got {self.prior_sparsity!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"LearnConfig.strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        self.state_dtype = parse_dtype(self.state_dtype)
        if str(self.state_dtype).replace("torch.", "") not in STATE_DTYPES:
            raise ValueError(f"LearnConfig.state_dtype must be one of {STATE_DTYPES}, got {self.state_dtype!r}")
        if self.batches_per_step is not None and (int(self.batches_per_step) != self.batches_per_step
                                                  or self.batches_per_step < 1):
            raise ValueError(f"LearnConfig.batches_per_step must be a positive integer, got {self.batches_per_step!r}")
        for name in ("steps", "calib_batches", "checkpoint_every"):
            v = getattr(self, name)
            if int(v) != v or v < (0 if name == "steps" else 1):
                raise ValueError(f"LearnConfig.{name} must be a {'non-negative' if name == 'steps' else 'positive'}"
                                 f" integer, got {v!r}")
            setattr(self, name, int(v))
        for name in (("lr", "prior_strength") + (("lr_24",) if self.lr_24 is not None else ())
                     + (("prior_strength_24",) if self.prior_strength_24 is not None else ())):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"LearnConfig.{name} must be positive, got {getattr(self, name)!r}")
        for name in ("lambda1", "lambda2"):
            if float(getattr(self, name)) < 0:
                raise ValueError(f"LearnConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        self.tau = _pair("tau", self.tau)
        if self.kappa_tile is not None:       # None stays None: the default follows ``mode``
            self.kappa_tile = _pair("kappa_tile", self.kappa_tile)
        self.kappa_24 = _pair("kappa_24", self.kappa_24)
        self.dtype = parse_dtype(self.dtype)
        if self.resume and not self.checkpoint_dir:
            raise ValueError("LearnConfig.resume=True needs LearnConfig.checkpoint_dir")
        self.include = list(self.include) if self.include else None
        if self.density_weights is not None:
            if not isinstance(self.density_weights, Mapping) or not self.density_weights:
                raise ValueError("LearnConfig.density_weights must be a non-empty {fqn: weight} dict, got "
                                 f"{type(self.density_weights).__name__}")
            bad = {k: v for k, v in self.density_weights.items()
                   if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0}
            if bad:
                raise ValueError(f"LearnConfig.density_weights must be finite and >= 0; bad: {dict(list(bad.items())[:3])}")
            if not any(v > 0 for v in self.density_weights.values()):
                raise ValueError("LearnConfig.density_weights are all 0: no layer would be pushed towards 2:4")
            self.density_weights = {str(k): float(v) for k, v in self.density_weights.items()}
        self.exclude = list(self.exclude) if self.exclude else None

    @property
    def pattern_lr(self) -> float:
        """The learning rate of the 2:4 pattern logits in force: ``lr_24``, else ``lr / 10``."""
        return float(self.lr_24) if self.lr_24 is not None else float(self.lr) / 10

    @property
    def pattern_prior_strength(self) -> float:
        """The step-0 gap of the prior's 2:4 patterns in force: ``prior_strength_24``, else ``prior_strength``."""
        return float(self.prior_strength_24 if self.prior_strength_24 is not None else self.prior_strength)

    @property
    def tile_kappa(self) -> tuple[float, float]:
        """The tile-logit scale schedule in force: ``kappa_tile`` or the paper's default for ``mode``."""
        return self.kappa_tile if self.kappa_tile is not None else DEFAULT_KAPPA_TILE[self.mode]

    def schedule(self, step: int) -> dict[str, float]:
        """τ and κ at ``step`` (linear from start at step 0 to end at the last step)."""
        f = step / max(1, self.steps - 1)
        lin = lambda p: p[0] + (p[1] - p[0]) * f  # noqa: E731
        return {"tau": lin(self.tau), "kappa_tile": lin(self.tile_kappa), "kappa_24": lin(self.kappa_24),
                "decay": 1.0 - step / max(1, self.steps)}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dtype"] = None if self.dtype is None else str(self.dtype).replace("torch.", "")
        d["state_dtype"] = str(self.state_dtype).replace("torch.", "")
        d["tile"], d["tau"] = list(self.tile), list(self.tau)
        d["kappa_tile"], d["kappa_24"] = list(self.tile_kappa), list(self.kappa_24)
        d["lr_24"] = self.pattern_lr
        d["prior_strength_24"] = self.pattern_prior_strength
        return d
