"""Output memory kept across dispatch / combine calls (comms/core/memory.py says how and why).

An MoE layer asks for the same large outputs every step (recv_x, expert_x, combine's
[num_tokens, hidden], the gradients: hundreds of MiB per rank); their blocks stay with this
process and are handed out again once no array, view or tensor refers to them.

TOPOCOMM_MOE_CACHE_MB caps the bytes kept while free (default 2048; 0 turns the cache off);
comms.moe.empty_cache() drops the free blocks now.
"""
from __future__ import annotations

import os

import numpy as np

from comms.core.memory import BlockCache

MIN_BYTES = 1 << 20          # smaller outputs come from numpy directly
DEFAULT_CAP_MB = 2048

_cache = BlockCache()


def cap_bytes() -> int:
    text = os.environ.get("TOPOCOMM_MOE_CACHE_MB", "")
    try:
        mb = float(text) if text.strip() else DEFAULT_CAP_MB
    except ValueError:
        raise ValueError(f"TOPOCOMM_MOE_CACHE_MB: expected a number of MiB, got {text!r}") \
            from None
    return max(0, int(mb * (1 << 20)))


def empty(nbytes: int) -> np.ndarray:
    """An uninitialised uint8 array of nbytes (a view of a cached block when one is free)."""
    cap = cap_bytes() if nbytes >= MIN_BYTES else 0
    return _cache.empty(nbytes, MIN_BYTES, cap)


def empty_cache() -> int:
    """Release the cached blocks no output refers to any more; returns the bytes released."""
    return _cache.release()


def cached_bytes() -> tuple:
    """(bytes in use by live outputs, bytes kept free) in the cache."""
    return _cache.stats()
