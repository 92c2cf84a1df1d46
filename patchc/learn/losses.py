"""The task losses of mask learning: next-token cross-entropy ("lm") and KL to the dense model
("distill"), both averaged over the real tokens; "distill" optionally adds a block-output matching
term (:func:`hidden_mismatch`)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .calib import output_logits
from .stream import first_output

# logits rows per float32 chunk of the cross-entropy: 2^18 elements (1 MiB) per temporary
_CHUNK_ELEMS = 1 << 18


class _TokenCE(torch.autograd.Function):
    """``F.cross_entropy(logits.float(), target, ignore_index=-100)`` over rows [R, V], without
    a float32 copy of the logits: the float32 log-softmax is computed a few rows at a time, in
    forward and again in backward, and the gradient is written in the logits' dtype.  Each row
    goes through the same operations as in the unchunked call (``log_softmax``, the mean
    ``nll_loss`` and their backward), so values and gradients are the same.  On a 32 000-word
    vocabulary at 128 tokens this keeps 3 float32 logits-sized tensors (49 MB) from being alive
    at once, which matters when the model is small next to its vocabulary."""

    @staticmethod
    def forward(ctx, logits, target, rows, order):
        picked = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        ctx.save_for_backward(logits, target)
        safe = target.clamp_min(0)[:, None]
        for r0 in range(0, logits.shape[0], rows):
            ls = torch.log_softmax(logits[r0:r0 + rows].float(), -1)
            picked[r0:r0 + rows] = ls.gather(1, safe[r0:r0 + rows])[:, 0]
        # the mean over the picked values (of the rows in ``order``) by the same kernel, in the same
        # order, as the unchunked call
        if order is not None:
            picked, target = picked[order], target[order]
        loss = F.nll_loss(picked[:, None], target.masked_fill(target != -100, 0), ignore_index=-100)
        ctx.rows = rows
        return loss

    @staticmethod
    def backward(ctx, g):
        logits, target = ctx.saved_tensors
        rows = ctx.rows
        valid = target != -100
        # nll_loss's backward (mean): −g / (number of counted rows) at each row's target
        val = -(g / valid.sum().to(torch.float32))
        grad = torch.empty_like(logits)
        for r0 in range(0, logits.shape[0], rows):
            ls = torch.log_softmax(logits[r0:r0 + rows].float(), -1)
            gls = torch.zeros_like(ls)
            t, ok = target[r0:r0 + rows], valid[r0:r0 + rows]
            gls[ok.nonzero()[:, 0], t[ok]] = val
            grad[r0:r0 + rows] = torch._log_softmax_backward_data(gls, ls, -1, torch.float32)
        return grad, None, None, None


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of logits [B, T, V] against labels [B, T] (−100: ignored)."""
    b, t, v = logits.shape
    rows = max(1, _CHUNK_ELEMS // v)
    if b == 1:
        return _TokenCE.apply(logits[0, :-1], labels[0, 1:], rows, None)
    # every position of the [B·T, V] view (no copy of the logits), each row's last one ignored;
    # the mean runs over the [B, T−1] rows in their order
    full = torch.cat([labels[:, 1:], labels.new_full((b, 1), -100)], 1).reshape(-1)
    order = torch.arange(b * t, device=labels.device).view(b, t)[:, :-1].reshape(-1)
    return _TokenCE.apply(logits.reshape(b * t, v), full, rows, order)


class _BlockOutputs:
    """Forward hooks that keep each block's output (its hidden states) while the ``with`` lasts."""

    def __init__(self, blocks):
        self.blocks, self.out = list(blocks or ()), []

    def __enter__(self):
        self.hooks = [b.register_forward_hook(lambda mod, args, out: self.out.append(first_output(out)))
                      for b in self.blocks]
        return self.out

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()


def hidden_mismatch(student: list, teacher: list, valid: torch.Tensor) -> torch.Tensor:
    """Mean over blocks and real tokens of ‖h_student − h_teacher‖² / ‖h_teacher‖² (float32).
    Relative per token: the residual stream's norm varies by orders of magnitude between tokens
    (a first token's can be 100× the rest), which an absolute error would let one token decide."""
    if len(student) != len(teacher) or not student:
        raise RuntimeError(f"hidden distillation: {len(student)} student and {len(teacher)} teacher block "
                           "outputs (each block must run once per forward)")
    terms = []
    for s, t in zip(student, teacher):
        s, t = s.float().reshape(-1, s.shape[-1])[valid], t.float().reshape(-1, t.shape[-1])[valid]
        terms.append(((s - t).square().sum(-1) / t.square().sum(-1).clamp_min(1e-12)).mean())
    return torch.stack(terms).mean()


def task_loss(model: nn.Module, ctx, inputs: dict, kind: str, blocks=None,
              hidden: float = 0.0) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(loss, block mismatch or None): next-token CE ("lm") or KL(dense ‖ masked) ("distill") on
    one batch, mean over real tokens.  ``ctx``: the run's :class:`~patchc.learn.state.StepContext`
    (its masks are off for the teacher).  ``hidden > 0`` (distill only) adds ``hidden`` ×
    :func:`hidden_mismatch` of the outputs of ``blocks`` (the decoder blocks), student against
    teacher, and returns that mismatch (unweighted) second."""
    inputs = dict(inputs)
    labels = inputs.pop("labels", None)
    if labels is None:
        if "input_ids" not in inputs:
            raise ValueError("batches: a dict batch without 'input_ids' needs 'labels' for the loss")
        labels = inputs["input_ids"].clone()
        if "attention_mask" in inputs:
            labels = labels.masked_fill(inputs["attention_mask"] == 0, -100)
    if kind == "lm":
        return lm_loss(output_logits(model(**inputs)), labels), None
    watch = blocks if hidden > 0 else None
    ctx.masks_on = False
    try:
        with torch.no_grad(), _BlockOutputs(watch) as h_teacher:
            teacher = output_logits(model(**inputs)).float()
    finally:
        ctx.masks_on = True
    with _BlockOutputs(watch) as h_student:
        logits = output_logits(model(**inputs)).float()
    valid = (labels != -100).reshape(-1)
    logp_s = F.log_softmax(logits, -1).reshape(-1, logits.shape[-1])[valid]
    logp_t = F.log_softmax(teacher, -1).reshape(-1, logits.shape[-1])[valid]
    kl = F.kl_div(logp_s, logp_t, log_target=True, reduction="batchmean")
    if watch is None:
        return kl, None
    mismatch = hidden_mismatch(h_student, h_teacher, valid)
    return kl + hidden * mismatch, mismatch
