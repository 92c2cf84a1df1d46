"""Helpers shared by the ``patchc`` subcommands: argument types, checks of the flags before any
work (paths, device, model), errors worded in flags, byte tables."""
from __future__ import annotations

import argparse
import os
import re

import torch

from .tiles import check_tile


class FlagError(ValueError):
    """A command-line flag that cannot work; the message names the flag."""


def parse_tile(s: str) -> tuple[int, int]:
    """argparse type for a tile: ``128x128`` (or ``128,128``), checked by ``patchc.tiles.check_tile``."""
    try:
        a, b = (int(v) for v in s.lower().replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"tile must look like 128x128 (ROWSxCOLS), got {s!r}") from None
    try:
        return check_tile((a, b))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def sparsity(s: str) -> float:
    """argparse type for a global sparsity: a number in [0, 0.5] (a 2:4 tile prunes half)."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 0.5], got {s!r}") from None
    if not 0.0 <= v <= 0.5:
        raise argparse.ArgumentTypeError(f"must be in [0, 0.5], got {s} (a 2:4 tile prunes half of its weights, so "
                                         "0.5 is the most a plan can prune; below 0.5 the plan is hybrid)")
    return v


def positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s!r}")
    return v


def _finite_float(s: str, zero_ok: bool) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    if not (0 <= v if zero_ok else 0 < v) or not v < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number {'>=' if zero_ok else '>'} 0, got {s}")
    return v


def positive_float(s: str) -> float:
    """argparse type: a finite number > 0."""
    return _finite_float(s, zero_ok=False)


def nonneg_float(s: str) -> float:
    """argparse type: a finite number >= 0."""
    return _finite_float(s, zero_ok=True)


def unit_fraction(s: str) -> float:
    """argparse type: a number in (0, 1]."""
    v = _finite_float(s, zero_ok=False)
    if v > 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {s}")
    return v


def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def packed_bytes_table(plan, dtype: torch.dtype) -> tuple[int, int]:
    """(packed bytes, dense bytes) of the plan's weights in ``dtype`` (``packing.packed_nbytes``)."""
    from .packing import packed_nbytes
    e = torch.empty((), dtype=dtype).element_size()
    packed = sum(packed_nbytes(m, dtype) for m in plan.values())
    dense = sum(m.shape[0] * m.shape[1] * e for m in plan.values())
    return packed, dense


# ---- checks before the work ---------------------------------------------------------------
def check_writable(path: str, flag: str, is_dir: bool = False) -> None:
    """``FlagError`` unless ``path`` can be written: no file where a folder is needed (or the
    reverse), the nearest existing parent a writable folder."""
    p = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(p) and not is_dir:
        raise FlagError(f"{flag} {path}: is a directory; give a file name")
    if os.path.exists(p) and not os.path.isdir(p) and is_dir:
        raise FlagError(f"{flag} {path}: is a file; give a folder")
    parent = os.path.dirname(p)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise FlagError(f"{flag} {path}: {parent} is a file, not a folder")
    probe = p if (is_dir and os.path.isdir(p)) else parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise FlagError(f"{flag} {path}: {probe} is not writable")


_OUTPUTS = (("out", "--out", False), ("out_dir", "--out", True), ("plot", "--plot", False),
            ("log", "--log", False), ("checkpoint_dir", "--checkpoint-dir", True),
            ("save_model", "--save-model", True))
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "spiece.model")


def preflight(args, needs_tokenizer: bool = False) -> None:
    """Check what the flags name before any work starts: output paths, ``--text`` files,
    ``--device``, ``--model`` (and its tokenizer files when text will be tokenized)."""
    for dest, flag, is_dir in _OUTPUTS:
        v = getattr(args, dest, None)
        if v:
            check_writable(v, flag, is_dir)
    for t in getattr(args, "text", None) or []:
        if not os.path.exists(t):
            raise FlagError(f"--text {t}: no such file (--text takes a text file)")
        if not os.path.isfile(t):
            raise FlagError(f"--text {t}: not a file")
    dev = getattr(args, "device", None)
    if dev and str(dev).startswith("cuda") and not torch.cuda.is_available():
        raise FlagError(f"--device {dev}: CUDA is not available here (torch {torch.__version__}, "
                        f"{'built without CUDA' if torch.version.cuda is None else 'no GPU visible'})")
    model = getattr(args, "model", None)
    if model:
        from .data import resolve_model_path
        where = resolve_model_path(model)
        if needs_tokenizer and os.path.isdir(where) and not any(
                os.path.isfile(os.path.join(where, f)) for f in _TOKENIZER_FILES):
            raise FlagError(f"--model {model}: the checkpoint has no tokenizer files ({', '.join(_TOKENIZER_FILES[:3])}"
                            "...); save the tokenizer next to the model (tokenizer.save_pretrained(DIR))")


# ---- errors worded in flags -----------------------------------------------------------------
_FIELD_DEST = {"target_sparsity": "sparsity", "log_path": "log"}


def speak_flags(msg: str, parser: argparse.ArgumentParser) -> str:
    """Rewrite config field names in an error message (``LearnConfig.resume=True needs
    LearnConfig.checkpoint_dir``) as the subcommand's flags (``--resume needs --checkpoint-dir``)."""
    flags = {a.dest: a.option_strings[-1] for a in parser._actions if a.option_strings}

    def sub(m):
        field = m.group(1)
        flag = flags.get(_FIELD_DEST.get(field, field))
        return flag if flag else m.group(0)

    msg = re.sub(r"\b\w*Config\.(\w+)(?:=(?:True|False))?", sub, msg)
    return re.sub(r"^(target_sparsity)\b", sub, msg)
