"""The on-disk kernel cache: ``<cache_dir>/<kernel name>/<key>/kernel.py`` + ``spec.json``.

``get_kernel(spec)`` returns a ``GeneratedKernel``; per process it renders once per distinct spec
(memoised by key and cache dir).  On disk an entry is valid when ``spec.json`` names the same key
and records the sha256 of ``kernel.py``; a missing, truncated or foreign entry is re-rendered.
Every write goes to a temporary file in the same folder and is moved into place with
``os.replace`` (atomic on POSIX), so processes that fill the cache at the same time all succeed:
they write identical bytes and the last rename wins.
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Optional, Union

from patchc.caches import BoundedCache
from patchc.files import atomic_write, cache_root

from .kernels import GeneratedKernel
from .args import sample_args
from .render import render
from .spec import KernelSpec, codegen_hash, versions

# process-wide statistics: hits (valid on disk), misses (rendered and written), regenerated
# (an entry with both files but wrong contents was replaced), incomplete (one file missing: being
# written by another process), memo (served from this process's memo without touching disk)
stats: collections.Counter = collections.Counter()
_MEMO = BoundedCache("generated kernels", 4096)   # (key, root) -> GeneratedKernel
_LOCK = threading.Lock()


def kernel_dir(cache_dir: Union[str, os.PathLike, None] = None) -> Path:
    """Where generated kernels live: ``<cache root>/kernels`` (``patchc.files.cache_root``)."""
    return cache_root(cache_dir) / "kernels"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_entry(d: Path, key: str) -> tuple[Optional[str], str]:
    """(cached source or None, state) of the entry in ``d``, from one read of each file: "valid"
    (complete, matches ``key``), "absent" (no file), "incomplete" (one file: being written by another
    process, or it died doing so) or "invalid" (both files, wrong contents: torn or foreign).
    spec.json is read first and written last, so a complete spec.json implies its kernel.py."""
    def read(name):
        try:
            return (d / name).read_bytes()
        except OSError:
            return None
    meta, data = read("spec.json"), read("kernel.py")
    if meta is None or data is None:
        return None, "absent" if meta is None and data is None else "incomplete"
    try:
        meta = json.loads(meta)
    except ValueError:
        return None, "invalid"
    if not isinstance(meta, dict) or meta.get("key") != key or meta.get("sha256") != sha256(data):
        return None, "invalid"
    return data.decode(), "valid"


def _write_entry(d: Path, spec: KernelSpec, key: str, source: str) -> None:
    data = source.encode()
    atomic_write(d / "kernel.py", data)
    meta = {"name": spec.name, "key": key, "sha256": sha256(data), "spec": spec.to_dict(),
            "args": sample_args(spec), "codegen": codegen_hash(), "versions": versions()}
    # spec.json goes last: an entry without it (or with another checksum) is never trusted
    atomic_write(d / "spec.json", json.dumps(meta, indent=1, sort_keys=True).encode())


def get_kernel(spec: KernelSpec, cache_dir=None) -> GeneratedKernel:
    """The ``GeneratedKernel`` for ``spec``: from this process's memo, the disk cache, or rendered."""
    spec.validate()
    key = spec.key()
    root = kernel_dir(cache_dir)
    memo_key = (key, str(root))
    with _LOCK:
        gk = _MEMO.get(memo_key)
        if gk is not None and _read_entry(gk.path.parent, key)[1] == "valid":
            stats["memo"] += 1
            return gk
        d = root / spec.name / key
        # classified from what was read, not from a second look at the disk, which another
        # process may have finished writing in between
        source, state = _read_entry(d, key)
        hit = state == "valid"
        if hit:
            stats["hits"] += 1
        else:
            if state == "invalid":      # both files, wrong contents: a torn or foreign entry
                stats["regenerated"] += 1
            elif state == "incomplete":
                stats["incomplete"] += 1
            stats["misses"] += 1
            source = render(spec)
            _write_entry(d, spec, key, source)
        gk = GeneratedKernel(spec=spec, key=key, source=source, path=d / "kernel.py", cache_hit=hit)
        _MEMO.put(memo_key, gk)
        return gk


def clear_memo() -> None:
    """Forget this process's memo (the disk cache stays)."""
    with _LOCK:
        _MEMO.clear()
