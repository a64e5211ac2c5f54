"""Output memory kept across dispatch / combine calls, like torch's caching allocators.

An MoE layer asks for the same large outputs every step (recv_x, expert_x, combine's
[num_tokens, hidden]: hundreds of MiB per rank). Fresh memory costs page faults on first
touch, and where the kernel hands freed memory back to a hypervisor (free page reporting,
virtio-balloon) a buffer that sat free for a couple of seconds costs a host fault per page
again: 550-800 ms to touch 256 MiB on this machine instead of 17 ms, measured. So the blocks
behind large outputs stay with this process and are handed out again once free.

Free means: no array, view or torch tensor refers to the block any more. Every view of a
numpy array keeps its owner alive, and torch.from_numpy keeps the array alive, so the
owner's reference count is back at what the cache alone holds exactly when the last user
is gone. A block in use is never handed out; contents of a reused block are undefined (as
np.empty). Blocks are only reused for requests of at least half their size.

TOPOCOMM_MOE_CACHE_MB caps the bytes kept while free (default 2048; 0 turns the cache off);
comms.moe.empty_cache() drops the free blocks now. Free-threaded Python builds (no GIL:
reference counts are not exact there) do not cache.
"""
from __future__ import annotations

import os
import sys
import threading

import numpy as np

MIN_BYTES = 1 << 20          # smaller outputs come from numpy directly
DEFAULT_CAP_MB = 2048

_lock = threading.Lock()
_blocks: list = []           # [owner uint8 array, its reference count when free]; LRU first


def cap_bytes() -> int:
    text = os.environ.get("TOPOCOMM_MOE_CACHE_MB", "")
    try:
        mb = float(text) if text.strip() else DEFAULT_CAP_MB
    except ValueError:
        raise ValueError(f"TOPOCOMM_MOE_CACHE_MB: expected a number of MiB, got {text!r}") \
            from None
    return max(0, int(mb * (1 << 20)))


def _enabled() -> bool:
    gil = getattr(sys, "_is_gil_enabled", None)
    return gil is None or gil()


def _is_free(entry) -> bool:
    return sys.getrefcount(entry[0]) <= entry[1]


def empty(nbytes: int) -> np.ndarray:
    """An uninitialised uint8 array of nbytes (a view of a cached block when one is free)."""
    nbytes = int(nbytes)
    cap = cap_bytes() if nbytes >= MIN_BYTES and _enabled() else 0
    if nbytes > cap:
        return np.empty(nbytes, np.uint8)
    with _lock:
        for i, entry in enumerate(_blocks):
            if nbytes <= entry[0].nbytes <= 2 * nbytes and _is_free(entry):
                _blocks.append(_blocks.pop(i))          # most recently used last
                out = entry[0][:nbytes]
                _trim(cap)
                return out
        entry = [np.empty(nbytes, np.uint8), 0]
        _blocks.append(entry)
        entry[1] = sys.getrefcount(entry[0])            # what the cache alone holds
        out = entry[0][:nbytes]                         # in use from here on
        _trim(cap)
        return out


def _trim(cap: int) -> None:
    """Drop least recently used free blocks until the free ones fit in cap."""
    free = [e for e in _blocks if _is_free(e)]
    total = sum(e[0].nbytes for e in free)
    for e in free:
        if total <= cap:
            break
        _blocks.remove(e)
        total -= e[0].nbytes


def empty_cache() -> int:
    """Release the cached blocks no output refers to any more; returns the bytes released."""
    with _lock:
        free = [e for e in _blocks if _is_free(e)]
        for e in free:
            _blocks.remove(e)
        return sum(e[0].nbytes for e in free)


def cached_bytes() -> tuple:
    """(bytes in use by live outputs, bytes kept free) in the cache."""
    with _lock:
        free = sum(e[0].nbytes for e in _blocks if _is_free(e))
        return sum(e[0].nbytes for e in _blocks) - free, free
