"""The generated kernels' arguments, defined once: X, Y, (bias), the packed weight's buffers in
``packformat.KERNEL_BUFFERS`` order, then M.

``render`` names the parameters from ``arg_names``; ``launch`` passes ``launch_args``; the AOT
compile (``asm``) specialises on ``sample_args``, the same list with 16-byte-aligned stand-ins
for the tensors -- so a launch and ``asm()`` always build the same kernel.  ``views`` says which
dtype each tensor is read as: the 16-bit kernels read kept 2:4 values as 32-bit pairs, the 16-bit
gemv kernel also X and dense values.  M is not specialised on (``do_not_specialize``): one binary
serves every M of a kernel's range.
"""
from __future__ import annotations

from patchc.packformat import KERNEL_BUFFERS

SCALARS = ("M",)


def tensor_names(spec) -> list[str]:
    """The tensor arguments, in order (``b`` only with a bias)."""
    return ["x", "y"] + (["b"] if spec.bias else []) + list(KERNEL_BUFFERS)


def arg_names(spec) -> list[str]:
    """The kernel's parameters in order."""
    return [f"{t}_ptr" for t in tensor_names(spec)] + list(SCALARS)


def views(spec) -> dict:
    """Dtype name ("bf16", "i32", ...) every tensor argument is passed as."""
    e, pairs = spec.dtype, spec.dtype != "fp32"
    v = {"x": e, "y": "fp32" if spec.split_k > 1 else e, "b": e, "rows": "i32", "kidx": "i32",
         "sparse_vals": "i32" if pairs else e, "sparse_meta": "i32", "dense_vals": e}
    if spec.strategy == "gemv" and pairs:
        v.update(x="i32", dense_vals="i32")
    return v


def sample_args(spec, m: int = 1) -> list:
    """JSON-able stand-ins of a launch's arguments: ``{"ptr": dtype}`` per tensor, then M."""
    v = views(spec)
    return [{"ptr": v[t]} for t in tensor_names(spec)] + [int(m)]


def launch_args(spec, x2, y, packed, bias) -> list:
    """The arguments ``launch`` passes: tensors viewed as ``views`` says, then M = rows of ``x2``."""
    import torch

    from patchc.dtypes import torch_dtype
    v = views(spec)
    named = {"x": x2, "y": y, "b": bias, **packed.buffers()}
    out = []
    for t in tensor_names(spec):
        want = torch.int32 if v[t] == "i32" else torch_dtype(v[t])
        out.append(named[t] if named[t].dtype == want else named[t].view(want))
    return out + [x2.shape[0]]
