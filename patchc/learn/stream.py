"""Calibration one decoder block at a time: the statistics of one block's linears are alive at once.

The model runs up to its first decoder block once per batch (the block's arguments are caught by
a pre-hook); then each block in turn runs over every batch's arguments with statistics hooks on
its planned linears, the caller prunes those linears (:func:`calibrate`'s ``on_layers``), and the
block's outputs become the next block's inputs.  Without ``sequential`` those outputs are the
dense block's (every layer sees the dense model's activations, exactly as one full pass would);
with ``sequential`` the block runs again with the weights ``on_layers`` returned — pruned, or
SparseGPT's updated ones — so each block is calibrated on the outputs of the already-pruned
blocks before it (SparseGPT's own protocol).  The user's model is never modified: pruned weights
enter through a temporary forward of the linear.  ``device``: where each block runs (moved there
for its turn and back), e.g. a GPU for a model held on the CPU.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from .calib import check_called, collect_stats, decoder_blocks, model_device, stat_hooks, to_device
from .masking import _patch_forward, _restore_forward


class _Caught(Exception):
    pass


def _move(obj, device):
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_move(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj


def first_output(out):
    """A block's hidden states: its output, or the first element of a tuple output."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _with_hidden(args: tuple, kwargs: dict, h: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (h,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


@torch.no_grad()
def block_inputs(model: nn.Module, first: nn.Module, batches: list[dict], device=None) -> list[tuple]:
    """(args, kwargs) of the first decoder block for each batch: the model runs up to it."""
    caught: list[tuple] = []

    def hook(module, args, kwargs):
        caught.append((_move(args, device), _move(kwargs, device)))
        raise _Caught

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    extra = {"use_cache": False} if hasattr(getattr(model, "config", None), "use_cache") else {}
    try:
        for b in batches:
            try:
                model(**to_device(b, model_device(model)), **extra)
            except _Caught:
                continue
            raise ValueError("calibration: the model's forward never called its first decoder block")
    finally:
        handle.remove()
    return caught


@contextlib.contextmanager
def _on(block: nn.Module, device):
    """Run ``block`` on ``device`` for the duration (moved back afterwards)."""
    p = next(block.parameters(), None)
    home = p.device if p is not None else None
    if device is None or home is None or home == torch.device(device):
        yield
        return
    block.to(device)
    try:
        yield
    finally:
        block.to(home)


@contextlib.contextmanager
def substituted(mods: dict[str, nn.Module], weights: dict[str, torch.Tensor]):
    """The linears in ``weights`` compute ``F.linear(x, weights[name], b)`` for the duration."""
    saved = []
    try:
        for name, w in weights.items():
            saved.append((mods[name], _patch_forward(mods[name], lambda w=w: w)))
        yield
    finally:
        for mod, s in saved:
            _restore_forward(mod, s)


@torch.no_grad()
def calibrate(model: nn.Module, mods: dict[str, nn.Module], batches: list[dict],
              on_layers: Callable[[dict], dict], hessian: bool = False, sequential: bool = False,
              device=None, progress: bool = False) -> None:
    """Hand the calibration statistics of ``mods`` to ``on_layers``, one group at a time.

    A group is the planned linears of one decoder block (or those outside the blocks, calibrated
    in one dense pass of the whole model first).  ``on_layers(stats)`` gets ``{name: stats}``
    (``.sq``, ``.hess``, ``.rows``; see :func:`patchc.learn.calib.stat_hooks`) and returns
    ``{name: (out, in) weight}``, the weights the block's outputs are computed with when
    ``sequential``."""
    found = decoder_blocks(model)
    prefix, blocks = found if found is not None else ("", [])
    where: dict[int, dict[str, nn.Module]] = {}
    outside = {}
    for name, m in mods.items():
        rest = name[len(prefix) + 1:] if prefix and name.startswith(prefix + ".") else None
        idx = rest.split(".", 1)[0] if rest else None
        if idx is not None and idx.isdigit() and int(idx) < len(blocks):
            where.setdefault(int(idx), {})[name] = m
        else:
            outside[name] = m
    if outside:
        on_layers(collect_stats(model, outside, batches, hessian))
    if not where:
        return
    inputs = block_inputs(model, blocks[0], batches, device)
    last = max(where)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=last + 1, desc="calibrating blocks", dynamic_ncols=True)
    try:
        for i in range(last + 1):
            group = where.get(i, {})
            with _on(blocks[i], device):
                stats, new_batch, handles = stat_hooks(group, hessian)
                outs = []
                try:
                    for args, kwargs in inputs:
                        new_batch()
                        outs.append(first_output(blocks[i](*args, **kwargs)))
                finally:
                    new_batch()
                    for h in handles:
                        h.remove()
                if group:
                    check_called(group, stats)
                    weights = on_layers(stats)
                    del stats
                    if sequential and weights:
                        with substituted(group, weights):
                            outs = [first_output(blocks[i](*a, **k)) for a, k in inputs]
                    del weights
            if i < last:
                inputs = [_with_hidden(a, k, o) for (a, k), o in zip(inputs, outs)]
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
