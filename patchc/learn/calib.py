"""Shared plumbing of the learners: which linears, how batches reach the model, and calibration
statistics (per-input-feature squared norms for Wanda, X^T X for SparseGPT)."""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from ..modules import is_linear, select_linears


def default_linears(model: nn.Module, include: Optional[Iterable[str]] = None,
                    exclude: Optional[Iterable[str]] = None, what: str = "include") -> dict[str, nn.Module]:
    """The linears a learner plans, by FQN.

    With ``include``: every matching linear (LM head excluded).  Without: every linear inside
    the decoder blocks — the ``nn.ModuleList`` holding the most parameters (``model.layers``,
    ``transformer.h``) — so embeddings-side projections and the LM head stay dense.  A model
    without such a list falls back to every linear but the LM head.  Raises ``ValueError``
    naming the patterns when nothing matches.
    """
    mods = select_linears(model, include, exclude)
    blocks = decoder_blocks(model)
    if not include and blocks is not None:
        mods = {n: m for n, m in mods.items() if n.startswith(blocks[0] + ".")}
    if not mods:
        raise ValueError(f"{what}: the model has no linear layers to plan (include={include!r}, "
                         f"exclude={exclude!r}); check the FQN patterns against model.named_modules()")
    return mods


def decoder_blocks(model: nn.Module) -> Optional[tuple[str, nn.ModuleList]]:
    """(FQN, list) of the ``nn.ModuleList`` of linear-holding blocks with the most parameters."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList)
             and any(is_linear(x) for x in m.modules())]
    if not lists:
        return None
    return max(lists, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))


def as_inputs(batch) -> dict:
    """One batch → keyword arguments of the model: a tensor is ``input_ids``; a dict is used as is."""
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 1:
            batch = batch[None]
        if batch.dim() != 2 or batch.is_floating_point():
            raise ValueError(f"batches: an input_ids tensor must be integer [B, T], got {batch.dtype} "
                             f"{tuple(batch.shape)}")
        return {"input_ids": batch}
    if isinstance(batch, dict):
        if "input_ids" not in batch and "inputs_embeds" not in batch:
            raise ValueError(f"batches: a dict batch needs 'input_ids', got keys {sorted(batch)}")
        return dict(batch)
    raise ValueError(f"batches: each batch must be an input_ids tensor or a dict, got {type(batch).__name__}")


def materialize(batches, what: str = "batches") -> list[dict]:
    """Read the iterable once into a list of input dicts (learning cycles over it)."""
    if batches is None:
        raise ValueError(f"{what} is None; pass an iterable of input_ids tensors or dicts")
    out = [as_inputs(b) for b in batches]
    if not out:
        raise ValueError(f"{what} is empty: mask learning and wanda/sparsegpt need at least one batch")
    return out


def to_device(inputs: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def output_logits(out) -> torch.Tensor:
    """The logits of a model's output (transformers output, tuple, or a tensor)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"cannot find logits in a model output of type {type(out).__name__}")


class _Stats:
    __slots__ = ("sq", "hess", "rows")

    def __init__(self, k: int, device, hessian: bool):
        self.sq = torch.zeros(k, device=device)
        self.hess = torch.zeros(k, k, device=device) if hessian else None
        self.rows = 0


def stat_hooks(mods: dict[str, nn.Module], hessian: bool):
    """Forward pre-hooks that accumulate, per linear, the squared norm of each input feature
    (``.sq``) and, with ``hessian``, XᵀX (``.hess``) and the row count.  Linears fed the same
    tensor (q/k/v, gate/up) share one accumulator, which keeps SparseGPT's K×K matrices to one per
    distinct input (4 per block in a LLaMA, not 7).  Returns (stats, new_batch, handles):
    call ``new_batch()`` before each batch, remove the handles when done."""
    stats: dict[str, _Stats] = {}
    seen: dict[tuple, tuple] = {}

    def hook(name):
        def fn(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            key = (x.data_ptr(), tuple(x.shape), x._version)
            prev = seen.get(key, (None, None))[0]
            if name not in stats:
                stats[name] = prev or _Stats(x.shape[-1], x.device, hessian)
            st = stats[name]
            if prev is st:                   # this tensor was already counted for a sibling
                return
            # holding x keeps its memory from being reused by another input within this batch,
            # which would alias two different inputs under one key
            seen[key] = (st, x)
            x2 = x.detach().reshape(-1, x.shape[-1]).float()
            st.sq += (x2 * x2).sum(0)
            if st.hess is not None:
                st.hess.addmm_(x2.t(), x2)
            st.rows += x2.shape[0]
        return fn

    handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True) for n, m in mods.items()]
    return stats, seen.clear, handles


def check_called(mods, stats) -> None:
    missing = [n for n in mods if n not in stats]
    if missing:
        raise ValueError(f"calibration: the model never called {missing[:3]}{'…' if len(missing) > 3 else ''} "
                         "on the batches; they cannot be calibrated")


@torch.no_grad()
def collect_stats(model: nn.Module, mods: dict[str, nn.Module], batches: list[dict],
                  hessian: bool = False) -> dict[str, _Stats]:
    """Run the (unmasked) model over ``batches`` with :func:`stat_hooks` on every planned linear
    at once (all their statistics are alive together; :func:`patchc.learn.stream.calibrate`
    keeps one decoder block's)."""
    stats, new_batch, handles = stat_hooks(mods, hessian)
    device = model_device(model)
    try:
        for b in batches:
            new_batch()
            model(**to_device(b, device))
    finally:
        for h in handles:
            h.remove()
    check_called(mods, stats)
    return stats
