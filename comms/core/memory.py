"""Large buffers kept and handed out again once nothing refers to them (like torch's caching
allocators): used for MoE outputs (comms/moe/cache.py) and for the temporaries of the
multi-host algorithms (one cache per group).

Why: fresh memory costs a page fault per page (per 2 MiB with transparent huge pages) on
first touch, and where the kernel hands freed memory back to a hypervisor (free page
reporting, virtio-balloon) a buffer that sat free for a couple of seconds costs a host fault
per page again: 550-800 ms to touch 256 MiB on the 2-vCPU CI machine instead of 17 ms,
measured. A collective or an MoE step that runs every few seconds hits exactly that.

Free means: no array, view or torch tensor refers to the block any more. Every numpy view
keeps its owner alive, and torch.from_numpy keeps the array alive, so the owner's reference
count is back at what the cache alone holds exactly when the last user is gone. A block in
use is never handed out; contents of a reused block are undefined (as np.empty). A block
serves requests of at least half its size. Free-threaded Python builds (no GIL: reference
counts are not exact there) do not cache.
"""
from __future__ import annotations

import sys
import threading

import numpy as np


def _enabled() -> bool:
    gil = getattr(sys, "_is_gil_enabled", None)
    return gil is None or gil()


def _is_free(entry) -> bool:
    return sys.getrefcount(entry[0]) <= entry[1]


class BlockCache:
    """uint8 blocks reused across calls; cap: the most bytes kept while free."""

    def __init__(self, cap_bytes: int = 0):
        self.cap_bytes = cap_bytes
        self._lock = threading.Lock()
        self._blocks: list = []      # [owner array, its reference count when free]; LRU first

    def empty(self, nbytes: int, min_bytes: int = 1 << 20, cap_bytes: int | None = None) \
            -> np.ndarray:
        """An uninitialised uint8 array of nbytes: a view of a free cached block when one
        fits; requests below min_bytes or above the cap come from numpy directly."""
        nbytes = int(nbytes)
        cap = self.cap_bytes if cap_bytes is None else cap_bytes
        if nbytes < min_bytes or nbytes > cap or not _enabled():
            return np.empty(nbytes, np.uint8)
        with self._lock:
            for i, entry in enumerate(self._blocks):
                if nbytes <= entry[0].nbytes <= 2 * nbytes and _is_free(entry):
                    self._blocks.append(self._blocks.pop(i))   # most recently used last
                    out = entry[0][:nbytes]
                    self._trim(cap)
                    return out
            entry = [np.empty(nbytes, np.uint8), 0]
            self._blocks.append(entry)
            entry[1] = sys.getrefcount(entry[0])               # what the cache alone holds
            out = entry[0][:nbytes]                            # in use from here on
            self._trim(cap)
            return out

    def _trim(self, cap: int) -> None:
        """Drop least recently used free blocks until the free ones fit in cap."""
        free = [e for e in self._blocks if _is_free(e)]
        total = sum(e[0].nbytes for e in free)
        for e in free:
            if total <= cap:
                break
            self._blocks.remove(e)
            total -= e[0].nbytes

    def release(self) -> int:
        """Forget the blocks nothing refers to any more; returns their bytes."""
        with self._lock:
            free = [e for e in self._blocks if _is_free(e)]
            for e in free:
                self._blocks.remove(e)
            return sum(e[0].nbytes for e in free)

    def stats(self) -> tuple:
        """(bytes in use, bytes kept free)."""
        with self._lock:
            free = sum(e[0].nbytes for e in self._blocks if _is_free(e))
            return sum(e[0].nbytes for e in self._blocks) - free, free
