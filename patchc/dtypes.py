"""Dtype facts, one home: short names ("bf16"), parsing user spellings, bytes per element, and the
same-size integer types used to move floats as raw bits (numpy has no bf16).

Imports torch only when a torch dtype is asked for: ``codegen.render`` (pure) uses the names."""
from __future__ import annotations


# every spelling a user or a torch dtype's str() gives -> the short name
_ALIASES = {"float32": "fp32", "float": "fp32", "fp32": "fp32", "float16": "fp16", "half": "fp16", "fp16": "fp16",
            "bfloat16": "bf16", "bf16": "bf16", "float64": "fp64", "double": "fp64", "fp64": "fp64"}
KERNEL_DTYPES = ("fp16", "bf16", "fp32")         # what the generated kernels and the cost model take
ELT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}
# the bits of a float of that size without its sign: ``(x.view(int) & mask) != 0`` is ``x != ±0``
NO_SIGN_BITS = {2: 0x7FFF, 4: 0x7FFFFFFF, 8: 0x7FFFFFFFFFFFFFFF}


def short_name(dtype, allowed=KERNEL_DTYPES) -> str:
    """'bf16' | 'fp16' | 'fp32' (| 'fp64' when allowed) for a torch dtype or any spelling of one;
    ``ValueError`` naming the accepted ones otherwise."""
    s = str(dtype).replace("torch.", "").lower()
    name = _ALIASES.get(s)
    if name is None or name not in allowed:
        raise ValueError(f"dtype must be one of {', '.join(allowed)}, got {dtype!r}")
    return name


def torch_dtype(name):
    """The ``torch.dtype`` of a short name or any spelling of one."""
    import torch
    return getattr(torch, {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp64": "float64"}[
        short_name(name, tuple(ELT_BYTES))])


def parse_dtype(dtype, allowed=("fp32", "fp16", "bf16", "fp64")):
    """``None``, a ``torch.dtype`` or a name ("bf16", "float32", ...) -> ``torch.dtype``."""
    import torch
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    return torch_dtype(short_name(dtype, allowed))


def __getattr__(name):
    if name == "SAME_SIZE_INT":
        # same-size integer view of an element size: floats moved or compared as bits (numpy has no bf16)
        import torch
        value = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
        globals()[name] = value
        return value
    raise AttributeError(f"module 'patchc.dtypes' has no attribute {name!r}")
