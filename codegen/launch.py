"""Launching generated kernels: grid, argument views, output, and the device the launch runs on.

``launch`` handles N-D ``x`` (reshaped to 2-D rows; copied when its rows are not contiguous or not
16-byte aligned, so every launch specialises like ``asm()``), output dtype = ``x.dtype``, M = 0,
the fp32 workspace of split-K, and launches on ``x.device`` (Triton launches on the current
device, which is wrong for a model spread over GPUs).  Nothing here synchronises with the host,
so a launch can be captured in a CUDA graph.
"""
from __future__ import annotations

import threading
from typing import Optional

import torch

from patchc.caches import BoundedCache

from .args import launch_args
from .interp import INTERPRET_MSG, fix_interpreter, interpreter_active
from .kernels import GeneratedKernel

_FNS = BoundedCache("kernel modules", 4096)      # kernel file -> its @triton.jit function
_LOCK = threading.Lock()


def kernel_fn(gk: GeneratedKernel):
    """The ``@triton.jit`` function of ``gk`` (its file imported once per process)."""
    fn = _FNS.get(gk.path)
    if fn is None:
        with _LOCK:
            from .load import load_module
            mod = load_module(gk.path, f"{gk.name}_{gk.key}")
            fn = _FNS.put(gk.path, getattr(mod, mod.KERNEL_NAME))
    return fn


def grid(spec, m: int) -> tuple[int, int, int]:
    """(tile-rows x sub-blocks, M blocks, K slices) programs of a launch with M = m."""
    tn = spec.tile[0]
    return -(-spec.n // tn) * -(-tn // spec.block_n), -(-m // spec.block_m), spec.split_k


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a contiguous tensor at a 16-byte aligned address (a copy only when needed)."""
    if not t.is_contiguous():
        return t.contiguous()
    return t.clone() if t.data_ptr() % 16 else t


def launch(gk: GeneratedKernel, x: torch.Tensor, packed, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Run ``gk`` on ``x`` [..., K] with ``packed``; returns [..., N] in ``x.dtype``."""
    s = gk.spec
    if x.device.type != "cuda":
        if not interpreter_active() or not s.interpret:
            raise RuntimeError(INTERPRET_MSG)
        fix_interpreter()
    if x.shape[-1] != s.k:
        raise ValueError(f"{gk.name}: x has {x.shape[-1]} features, the kernel takes K={s.k}")
    if packed.device != x.device:
        raise ValueError(f"{gk.name}: x is on {x.device} but the packed weight on {packed.device}")
    x2 = _aligned(x.reshape(-1, s.k))
    m = x2.shape[0]
    split = s.split_k > 1
    y = (torch.zeros if split else torch.empty)((m, s.n), device=x.device,
                                                dtype=torch.float32 if split else x.dtype)
    if m:
        b = _aligned(bias.to(x.dtype)) if s.bias else None
        args = launch_args(s, x2, y, packed, b)
        fn = kernel_fn(gk)
        if x.device.type == "cuda":
            with torch.cuda.device(x.device):
                fn[grid(s, m)](*args, num_warps=s.num_warps, num_stages=s.num_stages)
        else:
            fn[grid(s, m)](*args, num_warps=s.num_warps, num_stages=s.num_stages)
    if split and x.dtype != torch.float32:
        y = y.to(x.dtype)
    return y.reshape(*x.shape[:-1], s.n)
