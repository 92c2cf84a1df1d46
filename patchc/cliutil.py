"""Helpers shared by the ``patchc`` subcommands: argument types and byte tables."""
from __future__ import annotations

import argparse

import torch


def parse_tile(s: str) -> tuple[int, int]:
    """argparse type for a tile: ``128x128`` (or ``128,128``)."""
    try:
        a, b = (int(v) for v in s.lower().replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"tile must look like 128x128, got {s!r}") from None
    return a, b


def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def packed_bytes_table(plan, dtype: torch.dtype) -> tuple[int, int]:
    """(packed bytes, dense bytes) of the plan's weights in ``dtype`` (``packing.packed_nbytes``)."""
    from .packing import packed_nbytes
    e = torch.empty((), dtype=dtype).element_size()
    packed = sum(packed_nbytes(m, dtype) for m in plan.values())
    dense = sum(m.shape[0] * m.shape[1] * e for m in plan.values())
    return packed, dense
