"""Process-wide caches, one policy: bounded LRU, registered here so ``patchc.reset()`` clears them all.

What a compiled model needs to run (its runtime entries, packed weights, kernels) is owned by the
compiled model, not by these caches: they only save work (a mask file read once, a cost-model plan
computed once, a kernel module imported once), so clearing them never breaks a compiled model.
"""
from __future__ import annotations

import collections
import threading
from typing import Any, Callable, Hashable

_ALL: dict[str, "BoundedCache"] = {}


class BoundedCache:
    """A thread-safe LRU map of at most ``maxsize`` entries, registered under ``name``."""

    def __init__(self, name: str, maxsize: int):
        if name in _ALL:
            raise ValueError(f"a cache named {name!r} exists already")
        self.name, self.maxsize = name, int(maxsize)
        self._data: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()
        _ALL[name] = self

    def get(self, key: Hashable, default=None):
        with self._lock:
            if key not in self._data:
                return default
            self._data.move_to_end(key)
            return self._data[key]

    def put(self, key: Hashable, value) -> Any:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)
        return value

    def get_or_compute(self, key: Hashable, compute: Callable[[], Any]):
        """The cached value of ``key``, else ``compute()`` (outside the lock) stored under it."""
        hit = self.get(key, _MISSING)
        if hit is not _MISSING:
            return hit
        return self.put(key, compute())

    def pop(self, key: Hashable, default=None):
        with self._lock:
            return self._data.pop(key, default)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def values(self) -> list:
        with self._lock:
            return list(self._data.values())

    def __contains__(self, key) -> bool:
        with self._lock:
            return key in self._data

    def __len__(self) -> int:
        return len(self._data)


_MISSING = object()


def all_caches() -> dict[str, BoundedCache]:
    """Every registered cache by name."""
    return dict(_ALL)


def reset() -> None:
    """Clear every process-wide cache of patchc (mask files read, cost-model plans and fusion
    predictions, masks inferred from weights, generated-kernel modules, calibration reads).

    Compiled models keep working: what they run on is theirs.  The on-disk cache
    (``patchc.files.cache_root``) is not touched.
    """
    for cache in list(_ALL.values()):
        cache.clear()
