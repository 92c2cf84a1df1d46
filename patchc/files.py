"""Files, one home: the cache root patchc writes under, and atomic writes.

Cache layout under the root (``cache_dir=`` option, else ``$PATCHC_CACHE_DIR``, else
``$XDG_CACHE_HOME/patchc``, else ``~/.cache/patchc``): ``kernels/`` (generated Triton sources),
``plans/`` and ``fusion/`` (cost-model results), ``calibration.json`` (fitted device constants).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Union

ENV_VAR = "PATCHC_CACHE_DIR"


def cache_root(cache_dir: Union[str, os.PathLike, None] = None) -> Path:
    """``cache_dir`` when given, else ``$PATCHC_CACHE_DIR``, else ``$XDG_CACHE_HOME/patchc``, else
    ``~/.cache/patchc``."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "patchc"


def atomic_write(path: Union[str, os.PathLike], data: Union[bytes, str], mode: int = 0o644) -> Path:
    """Write ``data`` to ``path`` through a uniquely named temporary file in the same folder, then
    ``os.replace`` (atomic on POSIX): readers see the old file or the new one, never a part, and
    threads or processes writing the same path at once all succeed (the last rename wins)."""
    with atomic_path(path, mode) as tmp:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
    return Path(path)


@contextlib.contextmanager
def atomic_path(path: Union[str, os.PathLike], mode: int = 0o644):
    """A unique temporary path beside ``path`` for a writer that needs a file name (safetensors'
    ``save_file``), moved into place on success and removed on failure.  The file gets ``mode``
    less the umask (mkstemp's 0600 would make shared mask files unreadable to others)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, mode & ~_UMASK)
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _read_umask() -> int:
    m = os.umask(0o022)      # read once at import (os.umask can only be read by setting it)
    os.umask(m)
    return m


_UMASK = _read_umask()
