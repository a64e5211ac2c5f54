"""Output memory kept across dispatch / combine calls (comms/core/memory.py says how and why).

An MoE layer asks for the same large outputs every step (recv_x, expert_x, combine's
[num_tokens, hidden], the gradients: hundreds of MiB per rank); their blocks stay with this
process and are handed out again once no array, view or tensor refers to them.

TOPOCOMM_MOE_CACHE_MB caps the bytes kept while free (default 2048; 0 turns the cache off);
comms.moe.empty_cache() drops the free blocks now.
"""
from __future__ import annotations

import numpy as np

from comms.core import dtypes as dt
from comms.core.memory import BlockCache
from topology import env

MIN_BYTES = 1 << 20          # smaller outputs come from numpy directly
DEFAULT_CAP_MB = 2048

_cache = BlockCache()


def cap_bytes() -> int:
    mb = env.get("TOPOCOMM_MOE_CACHE_MB")
    return int((DEFAULT_CAP_MB if mb is None else mb) * (1 << 20))


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


def storage(a) -> np.ndarray:
    """numpy view sharing memory (bfloat16 as uint16 bits); `a` must be contiguous."""
    if isinstance(a, np.ndarray):
        return a
    import torch
    a = a.detach()
    if a.dtype == torch.bfloat16:
        return a.view(torch.int16).numpy().view(np.uint16)
    return a.numpy()


_STORE = {dt.F32: np.float32, dt.F64: np.float64, dt.BF16: np.int16}


def output(like_torch: bool, shape, code):
    """An output array/tensor (contents undefined). Large ones come from cache.py: memory of
    an earlier output nobody refers to any more, kept mapped, so no page faults. Allocated by
    numpy even for torch (then shared through torch.from_numpy): numpy asks for transparent
    huge pages on large buffers, which makes first-touch page faults of a 256 MiB output
    about 5x cheaper here than torch's default allocator (unless THP_MEM_ALLOC_ENABLE=1)."""
    store = np.dtype(_STORE[code])
    a = empty(int(np.prod(shape, dtype=np.int64)) * store.itemsize).view(store) \
        .reshape(shape)
    if like_torch:
        import torch
        t = torch.from_numpy(a)
        return t.view(torch.bfloat16) if code == dt.BF16 else t
    return a
