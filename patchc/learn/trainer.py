"""``learn_masks``: the training loop of PATCH-Tile / PATCH-Joint over frozen weights.

loss = task + λ1·|soft sparsity − target| − λ2·(1 − t/T)·‖M⊙W‖/‖W‖, where task is the
next-token cross-entropy (``loss="lm"``) or the KL divergence to the dense model's own output
(``loss="distill"``: the same modules run with their masks switched off, under no_grad), plus
``hidden_distill`` × the blocks' relative output mismatch to that dense run when set.
Only the mask logits receive gradients.  They live on the linears they mask
(:mod:`patchc.learn.state`); each linear draws its mask in its own forward.  Each logit tensor is
updated by Adam as soon as its gradient is final, during backward, and the gradient freed.

Under torch.distributed (:mod:`patchc.learn.dist`) every rank runs its share of each step's
batches with identical Gumbel noise and the gradients are averaged (``ddp``) or reduce-scattered
(``fsdp``), so all ranks hold the same logits and extract the same plan; rank 0 writes the files.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Callable, Optional

import torch
from torch import nn

from ..plan import MaskPlan
from ..prune import check_tile_fits, select_sparse_tiles
from ..modules import oriented_weight
from ..types import grid_of
from . import checkpoint as ckpt_io
from .calib import decoder_blocks, default_linears, materialize, model_device, to_device
from .config import LearnConfig
from .dist import Dist, setup
from .losses import task_loss
from .optim import Adam
from .priors import broadcast_priors, build_states, compute_priors, plan_patterns
from .state import MaskState, StepContext, attach, detach

log = logging.getLogger("patchc")


def _prepare_model(model: nn.Module, cfg: LearnConfig) -> dict:
    """Freeze every parameter, eval mode, optional activation checkpointing of each decoder block
    (our own wrapper: transformers' switch needs train mode and leaves an input hook behind).
    Returns what ``_restore_model`` needs to put the model back exactly."""
    saved = {"req": {n: p.requires_grad for n, p in model.named_parameters()}, "training": model.training,
             "blocks": []}
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    if cfg.grad_checkpointing:
        from torch.utils.checkpoint import checkpoint

        found = decoder_blocks(model)
        if found is None:
            raise ValueError("LearnConfig.grad_checkpointing=True: the model has no nn.ModuleList of "
                             "decoder blocks to checkpoint")
        for block in found[1]:
            def fwd(*args, _f=block.forward, **kwargs):
                return checkpoint(_f, *args, use_reentrant=False, **kwargs)
            saved["blocks"].append((block, block.__dict__.get("forward")))
            block.forward = fwd
    return saved


def _restore_model(model: nn.Module, saved: dict) -> None:
    for block, fwd in saved["blocks"]:
        if fwd is None:
            block.__dict__.pop("forward", None)
        else:
            block.forward = fwd
    for n, p in model.named_parameters():
        p.requires_grad_(saved["req"].get(n, p.requires_grad))
    model.train(saved["training"])


def hard_plan(states: list[MaskState], cfg: LearnConfig, steps_done: int, shapes: dict, full) -> MaskPlan:
    """Rank all tiles on their learned logits across layers (parameter-weighted) so the plan
    reaches the target sparsity with the fewest 2:4 tiles (at most +0.5 %, or what the grid
    allows, with a warning).
    ``full(t)`` gives a parameter whole (all ranks take part when it is sharded)."""
    costs = {st.name: full(st.tile_logits).detach().float().cpu() for st in states}
    sizes = {st.name: st.sizes.double().cpu() for st in states}
    allowed = {st.name: st.allowed.cpu() for st in states}
    kinds = select_sparse_tiles(costs, sizes, allowed, cfg.target_sparsity)
    masks = {st.name: st.to_tilemask(kinds[st.name], full) for st in states}
    plan = MaskPlan(masks, {"tile": list(cfg.tile), "method": f"patch-{cfg.mode}", "prior": cfg.prior,
                            "target_sparsity": cfg.target_sparsity, "steps": steps_done, "seed": cfg.seed,
                            "loss": cfg.loss, "lr": cfg.lr, "budget": "weighted" if cfg.density_weights else "count",
                            "prior_strength": cfg.prior_strength,
                            **({"lr_24": cfg.pattern_lr, "prior_strength_24": cfg.pattern_prior_strength}
                               if cfg.mode == "joint" else {}),
                            "fingerprint": {n: list(shapes[n]) for n in masks}})
    plan.meta["per_layer_sparsity"] = {n: round(m.sparsity(), 6) for n, m in masks.items()}
    log.info("patchc: learned plan, global sparsity %.4f (target %.4f)", plan.sparsity(), cfg.target_sparsity)
    for n, row in plan.per_layer().items():
        log.info("  %-48s sparsity %.4f  2:4 tiles %d/%d", n, row["sparsity"], row["sparse_tiles"], row["tiles"])
    return plan


def learn_masks(model: nn.Module, batches, config: Optional[LearnConfig] = None,
                callback: Optional[Callable[[int, dict], None]] = None, **overrides) -> MaskPlan:
    """Learn a hybrid dense/2:4 tile plan for ``model`` over frozen weights (PATCH).

    ``batches``: an iterable of ``input_ids`` tensors [B, T] or of dicts the model accepts
    (read once; steps cycle over it).  ``config``: a :class:`LearnConfig`; keyword ``overrides``
    replace its fields.  ``callback(step, record)`` is called after every step with that step's
    log record.  The model is restored exactly afterwards (forwards, ``requires_grad``, mode);
    only ``config.device``/``config.dtype`` move it, like ``model.to``.  With
    ``strategy="fsdp"`` (several ranks) its modules are left sharded by FSDP2's ``fully_shard``
    (weights unchanged; reload the model to use it unsharded).  Returns the hard plan, on every rank.
    """
    cfg = dataclasses.replace(config or LearnConfig(), **overrides) if overrides else (config or LearnConfig())
    data = materialize(batches)
    dist = setup(cfg, model)
    fsdp = dist.strategy == "fsdp"
    if cfg.dtype is not None or (dist.device is not None and not fsdp):
        model.to(device=None if fsdp else dist.device, dtype=cfg.dtype)     # fsdp moves each shard itself
    device = dist.device if fsdp and dist.device is not None else model_device(model)
    mods = default_linears(model, cfg.include, cfg.exclude, what="learn_masks")
    shapes = {n: tuple(oriented_weight(m).shape) for n, m in mods.items()}
    for n, s in shapes.items():
        check_tile_fits(n, s, cfg.tile)
    blocks = None
    if cfg.hidden_distill > 0:
        found = decoder_blocks(model)
        if found is None:
            raise ValueError(f"LearnConfig.hidden_distill={cfg.hidden_distill}: {type(model).__name__} has no "
                             "nn.ModuleList of decoder blocks whose outputs the term could match")
        blocks = list(found[1])
    patterns = plan_patterns(cfg.pattern_plan, shapes) if cfg.pattern_plan else None     # checked before any work
    per_step = cfg.batches_per_step or dist.world
    if per_step % dist.world:
        raise ValueError(f"LearnConfig.batches_per_step={per_step} cannot be split evenly over {dist.world} ranks")
    want = ckpt_io.header_of(cfg, shapes, per_step)
    header = ckpt_io.read_header(cfg.checkpoint_dir, want) if cfg.resume else None
    if cfg.density_weights is not None:
        missing, extra = sorted(set(mods) - set(cfg.density_weights)), sorted(set(cfg.density_weights) - set(mods))
        if missing or extra:
            raise ValueError(f"LearnConfig.density_weights must name exactly the learned linears: missing "
                             f"{missing[:3]}{' ...' if len(missing) > 3 else ''}, unknown {extra[:3]}")
    states = _initial_states(model, mods, shapes, data, cfg, dist, header, device if fsdp else None, patterns)
    for st in states.values():
        st.penalty_weight = cfg.density_weights[st.name] if cfg.density_weights else 1.0
    total = float(sum(st.sizes.sum() for st in states.values()))
    total_w = float(sum(st.sizes.sum() * st.penalty_weight for st in states.values()))
    w_sq = sum(st.w_sq for st in states.values())
    gen = torch.Generator(device=device)       # all the noise; the global RNG is left alone
    gen.manual_seed(cfg.seed)
    ctx = StepContext(gen, recompute=cfg.recompute_masks and cfg.mode == "joint")
    saved_model = _prepare_model(model, cfg)
    attached = attach(mods, states, ctx)
    hooks, logf, bar = [], None, None
    try:
        if fsdp:
            found = decoder_blocks(model)
            dist.shard(model, found[1] if found else None, cfg.offload_optimizer)
        order = list(states.values())
        adam = _adam(order, cfg)
        params = adam.params
        start = ckpt_io.load(header, order, adam, gen, dist) if header else 0
        if header:
            log.info("patchc: resuming from %s at step %d", header["path"], start)
        sync = _Sync()
        hooks = [p.register_post_accumulate_grad_hook(_updater(adam, i, sync, dist)) for i, p in enumerate(params)]
        logf = _open_log(cfg, dist.rank, start)
        bar = _progress(cfg, dist.rank, start)
        use_cache = {"use_cache": False} if hasattr(getattr(model, "config", None), "use_cache") else {}
        said_size = False
        for step in range(start, cfg.steps):
            mine = [(step * per_step + j) % len(data) for j in range(per_step)][dist.rank::dist.world]
            rec = _step(model, order, ctx, [{**to_device(data[i], device), **use_cache} for i in mine], cfg, step,
                        adam, sync, dist, (total, total_w), w_sq, blocks)
            if logf:
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
            if bar is not None:
                bar.set_postfix(loss=f"{rec['loss']:.4f}", density=f"{rec['soft_density']:.4f}", tau=f"{rec['tau']:.3f}")
                bar.update(1)
            if cfg.checkpoint_dir and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
                path = ckpt_io.save(cfg.checkpoint_dir, step + 1, order, adam, gen, want, dist)
                if not said_size and dist.rank == 0:
                    said_size = True
                    _say_checkpoint_size(path, total, cfg)
            if callback is not None:
                callback(step, rec)
        plan = hard_plan(order, cfg, cfg.steps, shapes, Dist.full)
    finally:
        for h in hooks:
            h.remove()
        detach(attached)
        _restore_model(model, saved_model)
        if bar is not None:
            bar.close()
        if logf:
            logf.close()
    return plan


def _say_checkpoint_size(path: str, weights: float, cfg: LearnConfig) -> None:
    """Say once how much disk a checkpoint takes: in joint mode it holds the 2:4 pattern logits
    and their Adam moments, about 18 B per planned weight (9 with ``state_dtype=bfloat16``)."""
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    log.warning("patchc: each checkpoint takes %.2f GB (%.1f B per planned weight) in %s; only the latest is kept%s",
                size / 1e9, size / max(weights, 1), os.path.dirname(path),
                "; --state-dtype bfloat16 halves it" if cfg.mode == "joint" and cfg.state_dtype == torch.float32 else "")


def _initial_states(model, mods, shapes, data, cfg, dist: Dist, header, device,
                    patterns: Optional[dict] = None) -> dict[str, MaskState]:
    """Every linear's learning state: from the one-shot prior (computed on every rank, rank 0's
    kept; ``patterns``, from :func:`plan_patterns`, replace its 2:4 patterns where taken), or —
    resuming — placeholders the checkpoint fills (tile mode reads its fixed 2:4 patterns now: the
    per-tile norms are computed from them before any sharding)."""
    if header is None:
        priors = compute_priors(model, mods, data, cfg, device=device,
                                progress=cfg.progress and dist.rank == 0 and cfg.prior != "magnitude")
        priors = broadcast_priors(priors, shapes, cfg.tile, dist)
        for name, (idx, taken) in (patterns or {}).items():
            pat = priors[name]["pattern24"]
            taken = taken.to(pat.device)
            pat[taken] = idx.to(pat.device)[taken]
    else:
        pats = ckpt_io.read_patterns(header, shapes) if cfg.mode == "tile" else {}
        priors = {n: {"pattern24": pats.get(n, torch.zeros(s[0], s[1] // 4, dtype=torch.uint8)),
                      "density": torch.zeros(grid_of(s, cfg.tile), dtype=torch.float64)} for n, s in shapes.items()}
    return build_states(mods, priors, cfg)


def _adam(states: list[MaskState], cfg: LearnConfig) -> Adam:
    """Adam over every logit tensor (sharded ones on their local shard): ``lr`` for the tile
    logits, ``pattern_lr`` for the 2:4 pattern logits."""
    params, keys, lrs = [], [], []
    for st in states:
        for kind, p, lr in (("tile_logits", st.tile_logits, cfg.lr), ("pattern_logits", st.pattern_logits,
                                                                      cfg.pattern_lr)):
            if p is not None:
                params.append(p)
                keys.append(f"{st.name}.{kind}")
                lrs.append(lr)
    return Adam(params, lrs, offload=cfg.offload_optimizer, keys=keys)


class _Sync:
    """Whether the running backward is the step's last (only then are gradients final)."""
    final = True


def _updater(adam: Adam, i: int, sync: _Sync, dist: Dist):
    def hook(p):
        if sync.final:
            dist.average_grad_(p)
            adam.update(i)
    return hook


def _step(model, states: list[MaskState], ctx: StepContext, batches: list[dict], cfg: LearnConfig, step: int,
          adam: Adam, sync: _Sync, dist: Dist, totals: tuple, w_sq: float, blocks=None) -> dict:
    """One optimisation step over this rank's batches (gradients accumulated); its log record."""
    t0 = time.perf_counter()
    sched = ctx.sched = cfg.schedule(step)
    for st in states:
        st.begin_step()
    adam.begin_step()
    total, total_w = totals
    sums = [0.0] * 6
    for j, batch in enumerate(batches):
        sync.final = j == len(batches) - 1
        ctx.stats.clear()
        ctx.collect = True
        try:
            task, hidden = task_loss(model, ctx, batch, cfg.loss, blocks, cfg.hidden_distill)
        finally:
            ctx.collect = False
        pruned, mag, weighted = zip(*ctx.stats)
        ctx.stats.clear()
        soft_sp = torch.stack(pruned).sum() / total
        # by count, or weighted by what each tile saves (LearnConfig.density_weights)
        soft_w = torch.stack(weighted).sum() / total_w if cfg.density_weights else soft_sp
        mag_ratio = (torch.stack(mag).sum() / w_sq).sqrt()
        loss = task + cfg.lambda1 * (soft_w - cfg.target_sparsity).abs() - cfg.lambda2 * sched["decay"] * mag_ratio
        (loss if len(batches) == 1 else loss / len(batches)).backward()
        for i, x in enumerate((loss, task, soft_sp, mag_ratio, soft_w, hidden)):
            sums[i] += 0.0 if x is None else float(x.detach()) / len(batches)
    loss, task, soft_sp, mag_ratio, soft_w, hidden = dist.mean(sums)
    extra = {"weighted_sparsity": soft_w} if cfg.density_weights else {}
    if cfg.hidden_distill > 0:          # task_loss = KL + hidden_distill × hidden_mismatch
        extra["hidden_mismatch"] = hidden
    return {"step": step, "loss": loss, "task_loss": task, "soft_sparsity": soft_sp, "soft_density": 1 - soft_sp, **extra,
            "magnitude": mag_ratio, "tau": sched["tau"], "kappa_tile": sched["kappa_tile"],
            "kappa_24": sched["kappa_24"], "seconds": round(time.perf_counter() - t0, 4)}


def _open_log(cfg: LearnConfig, rank: int, start: int):
    path = cfg.log_path or (os.path.join(cfg.checkpoint_dir, "learn_log.jsonl") if cfg.checkpoint_dir else None)
    if path is None or rank != 0:
        return None
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    keep = []
    if start and os.path.isfile(path):       # a resumed run rewrites the steps after its checkpoint
        with open(path) as f:
            keep = [line for line in f if line.strip() and json.loads(line).get("step", -1) < start]
    f = open(path, "w")
    f.writelines(keep)
    return f


def _progress(cfg: LearnConfig, rank: int, start: int):
    if not cfg.progress or rank != 0:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=cfg.steps, initial=start, desc=f"patch-{cfg.mode}", dynamic_ncols=True)
