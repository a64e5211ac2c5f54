"""Threads transport: all ranks are threads of one process sharing plain memory.

Used by the fast unit tests: the very same algorithms and counters as the shm
transport, without processes. Segments are found through a process-wide registry
keyed by a random token that rank 0 publishes through the store.
"""
from __future__ import annotations

import secrets
import threading

import numpy as np

from comms.core.store import everyones
from comms.transport.base import Transport

_registry: dict = {}
_lock = threading.Lock()


class ThreadsTransport(Transport):
    name = "threads"
    direct = "memcpy"  # peers' buffers live in this process

    def __init__(self, rank, size, store, prefix, layout):
        self._buf = np.zeros(layout.total_bytes + 4096, dtype=np.uint8)
        base = self._buf.ctypes.data
        base += (-base) % 4096
        token = secrets.token_hex(8)
        with _lock:
            _registry[token] = (base, self._buf)
        tokens = [t.decode() for t in everyones(store, f"{prefix}/threads", rank, size,
                                                  token.encode())]
        with _lock:
            entries = [_registry[t] for t in tokens]
        self.seg_bases = [e[0] for e in entries]
        # hold every peer's memory: a peer that closes first must not free what we read
        self._peer_bufs = [e[1] for e in entries]
        self.pids = [0] * size
        self._token = token
        # every rank has looked up every token before any may drop its own (close())
        everyones(store, f"{prefix}/threads/mapped", rank, size)

    def close(self):
        with _lock:
            _registry.pop(self._token, None)
