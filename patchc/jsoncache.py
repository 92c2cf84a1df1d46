"""A small on-disk JSON cache under the cache root: ``<root>/<kind>/<name>.json`` holding
``{"key": name, "value": ...}``.  Unreadable or foreign entries read as missing; writes are
atomic; a read-only cache costs time, not correctness."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from .files import atomic_write, cache_root

log = logging.getLogger("patchc")


def entry_path(cache_dir, kind: str, name: str) -> Path:
    return cache_root(cache_dir) / kind / f"{name}.json"


def read(path: Path, name: str):
    """The ``value`` stored under ``path`` for ``name``, or None (missing, unreadable, foreign)."""
    try:
        with open(path) as f:
            d = json.load(f)
        return d["value"] if isinstance(d, dict) and d.get("key") == name else None
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.info("patchc: ignoring unreadable cache entry %s (%s)", path, exc)
        return None


def write(path: Path, name: str, value) -> None:
    try:
        atomic_write(path, json.dumps({"key": name, "value": value}))
    except OSError as exc:
        log.info("patchc: could not write the cache entry %s (%s)", path, exc)


def cached(kind: str, name: str, compute, cache_dir=None):
    """``compute()`` (a JSON-able value) memoised on disk as ``<root>/<kind>/<name>.json``
    (``cache_dir=False``: not on disk)."""
    if cache_dir is False:
        return compute()
    path = entry_path(cache_dir, kind, name)
    value = read(path, name)
    if value is None:
        value = compute()
        write(path, name, value)
    return value
