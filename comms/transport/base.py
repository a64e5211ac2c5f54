"""The narrow interface every transport implements (as gloo's context/pair/buffer)."""
from __future__ import annotations

import abc


class Transport(abc.ABC):
    """Every rank's segment mapped in this process.

    seg_bases[q]: address of rank q's segment (seg_bases[rank] is our own, writable);
    pids[q]: the process id to watch for liveness (0 = do not watch).
    """

    name = "base"
    # how a rank can read a peer's own buffers: "memcpy" (same process), "cma"
    # (process_vm_readv), or None (only through the shared segments)
    direct = None
    seg_bases: list
    pids: list

    @abc.abstractmethod
    def close(self) -> None:
        """Unmap everything; idempotent."""
