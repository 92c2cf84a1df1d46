"""``learn_masks``: the training loop of PATCH-Tile / PATCH-Joint over frozen weights.

loss = task + λ1·|soft sparsity − target| − λ2·(1 − t/T)·‖M⊙W‖/‖W‖, where task is the
next-token cross-entropy (``loss="lm"``) or the KL divergence to the dense model's own output
(``loss="distill"``: the same modules run with their masks switched off, under no_grad).
Only the mask logits receive gradients.  Under torch.distributed every rank runs a shard of the
batches with identical Gumbel noise; logit gradients are averaged with an all-reduce, so all
ranks hold the same logits and extract the same plan; rank 0 writes the files.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..modules import fingerprint, oriented_weight
from ..plan import MaskPlan
from ..prune import check_tile_fits, select_sparse_tiles
from ..types import grid_of
from .calib import decoder_blocks, default_linears, materialize, model_device, output_logits, to_device
from .checkpoint import Adam, checkpoint_mask24, read_checkpoint, restore_state, save_checkpoint
from .config import LearnConfig
from .masking import LayerMask, install, uninstall
from .priors import build_layers, compute_priors

log = logging.getLogger("patchc")


def _dist_info() -> tuple[int, int]:
    """(rank, world size); joins the process group torchrun describes when none is set up yet."""
    import torch.distributed as dist
    if not dist.is_available():
        return 0, 1
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        log.info("patchc: joined a %s process group of %d ranks", dist.get_backend(), dist.get_world_size())
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def task_loss(model: nn.Module, layers: list[LayerMask], inputs: dict, kind: str) -> torch.Tensor:
    """Next-token CE ("lm") or KL(dense ‖ masked) ("distill") on one batch, mean over real tokens."""
    inputs = dict(inputs)
    labels = inputs.pop("labels", None)
    if labels is None:
        if "input_ids" not in inputs:
            raise ValueError("batches: a dict batch without 'input_ids' needs 'labels' for the loss")
        labels = inputs["input_ids"].clone()
        if "attention_mask" in inputs:
            labels = labels.masked_fill(inputs["attention_mask"] == 0, -100)
    if kind == "distill":
        for layer in layers:
            layer.enabled = False
        try:
            with torch.no_grad():
                teacher = output_logits(model(**inputs)).float()
        finally:
            for layer in layers:
                layer.enabled = True
    logits = output_logits(model(**inputs)).float()
    if kind == "lm":
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=-100)
    valid = (labels != -100).reshape(-1)
    logp_s = F.log_softmax(logits, -1).reshape(-1, logits.shape[-1])[valid]
    logp_t = F.log_softmax(teacher, -1).reshape(-1, logits.shape[-1])[valid]
    return F.kl_div(logp_s, logp_t, log_target=True, reduction="batchmean")


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


def hard_plan(model: nn.Module, layers: list[LayerMask], cfg: LearnConfig, steps_done: int) -> MaskPlan:
    """Rank all tiles on their learned logits across layers (parameter-weighted) so the plan
    meets the target sparsity exactly (±0.5 %, or the closest the grid allows, with a warning)."""
    costs = {ly.name: ly.tile_logits.detach().float().cpu() for ly in layers}
    sizes = {ly.name: ly.sizes.double().cpu() for ly in layers}
    allowed = {ly.name: ly.allowed.cpu() for ly in layers}
    kinds = select_sparse_tiles(costs, sizes, allowed, cfg.target_sparsity)
    masks = {ly.name: ly.to_tilemask(kinds[ly.name]) for ly in layers}
    plan = MaskPlan(masks, {"tile": list(cfg.tile), "method": f"patch-{cfg.mode}", "prior": cfg.prior,
                            "target_sparsity": cfg.target_sparsity, "steps": steps_done, "seed": cfg.seed,
                            "loss": cfg.loss, "lr": cfg.lr,
                            **({"lr_24": cfg.pattern_lr} if cfg.mode == "joint" else {}), "fingerprint": fingerprint(model, list(masks))})
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
    only ``config.device``/``config.dtype`` move it, like ``model.to``.  Returns the hard plan.
    """
    cfg = dataclasses.replace(config or LearnConfig(), **overrides) if overrides else (config or LearnConfig())
    data = materialize(batches)
    rank, world = _dist_info()
    dev = cfg.device
    if world > 1 and dev == "cuda":                 # torchrun: one GPU per local rank
        dev = f"cuda:{os.environ.get('LOCAL_RANK', rank)}"
    if dev is not None or cfg.dtype is not None:
        model.to(device=dev, dtype=cfg.dtype)
    device = model_device(model)
    mods = default_linears(model, cfg.include, cfg.exclude, what="learn_masks")
    shapes = {n: tuple(oriented_weight(m).shape) for n, m in mods.items()}
    for n, s in shapes.items():
        check_tile_fits(n, s, cfg.tile)
    shard = data[rank::world]
    if not shard:
        raise ValueError(f"batches: {len(data)} batches cannot feed {world} ranks (rank {rank} gets none)")
    ckpt = read_checkpoint(cfg.checkpoint_dir, cfg, shapes) if cfg.resume else None
    if ckpt is None:
        priors = compute_priors(model, mods, data, cfg)
    else:
        # the logits come from the checkpoint; only the fixed 2:4 prior is needed
        priors = {n: {"mask24": checkpoint_mask24(ckpt, n, s), "density": torch.zeros(grid_of(s, cfg.tile))}
                  for n, s in shapes.items()}
    layers = build_layers(mods, priors, cfg)
    params = [p for layer in layers for p in layer.params]
    adam = Adam(params, [cfg.lr if p is layer.tile_logits else cfg.pattern_lr for layer in layers for p in layer.params])
    gen = torch.Generator(device=device)       # all the noise; the global RNG is left alone
    gen.manual_seed(cfg.seed)
    start = restore_state(ckpt, layers, adam, gen) if ckpt else 0
    if ckpt:
        log.info("patchc: resuming from %s at step %d", ckpt["path"], start)
    if world > 1:
        _broadcast(params)
    w_sq = sum(layer.w_sq for layer in layers)
    total = float(sum(layer.sizes.sum() for layer in layers))
    logf = _open_log(cfg, rank, start)
    bar = _progress(cfg, rank, start)
    saved_model = _prepare_model(model, cfg)
    saved_fwd = install(layers)
    use_cache = {"use_cache": False} if hasattr(getattr(model, "config", None), "use_cache") else {}
    try:
        for step in range(start, cfg.steps):
            batch = {**to_device(shard[step % len(shard)], device), **use_cache}
            rec = _step(model, layers, batch, cfg, step, gen, adam, world, total, w_sq)
            if logf:
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
            if bar is not None:
                bar.set_postfix(loss=f"{rec['loss']:.4f}", density=f"{rec['soft_density']:.4f}", tau=f"{rec['tau']:.3f}")
                bar.update(1)
            if cfg.checkpoint_dir and rank == 0 and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
                save_checkpoint(cfg.checkpoint_dir, step + 1, layers, adam, gen, cfg)
            if callback is not None:
                callback(step, rec)
    finally:
        uninstall(layers, saved_fwd)
        _restore_model(model, saved_model)
        if bar is not None:
            bar.close()
        if logf:
            logf.close()
    return hard_plan(model, layers, cfg, cfg.steps)


def _step(model, layers: list[LayerMask], batch: dict, cfg: LearnConfig, step: int, gen, adam: Adam,
          world: int, total: float, w_sq: float) -> dict:
    """One optimisation step; returns its log record."""
    t0 = time.perf_counter()
    sched = cfg.schedule(step)
    pruned, mag = zip(*(layer.sample(sched, gen) for layer in layers))
    soft_sp = torch.stack(pruned).sum() / total
    mag_ratio = (torch.stack(mag).sum() / w_sq).sqrt()
    task = task_loss(model, layers, batch, cfg.loss)
    loss = task + cfg.lambda1 * (soft_sp - cfg.target_sparsity).abs() - cfg.lambda2 * sched["decay"] * mag_ratio
    adam.zero_grad()
    loss.backward()
    for layer in layers:
        layer.current = None                     # free the masked weights before the next draw
    if world > 1:
        _allreduce_grads(adam.params, world)
    adam.step()
    loss, task, soft_sp, mag_ratio = (float(x.detach()) for x in (loss, task, soft_sp, mag_ratio))
    return {"step": step, "loss": loss, "task_loss": task, "soft_sparsity": soft_sp, "soft_density": 1 - soft_sp,
            "magnitude": mag_ratio, "tau": sched["tau"], "kappa_tile": sched["kappa_tile"],
            "kappa_24": sched["kappa_24"], "seconds": round(time.perf_counter() - t0, 4)}


def _broadcast(params) -> None:
    import torch.distributed as dist
    for p in params:
        dist.broadcast(p.data, 0)


def _allreduce_grads(params, world: int) -> None:
    """Average the logit gradients over ranks in one flat all-reduce."""
    import torch.distributed as dist
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    i = 0
    for p in params:
        p.grad = flat[i:i + p.numel()].view_as(p)
        i += p.numel()


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
