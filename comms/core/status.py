"""The library's codes in one place: what a wait, an arrival or a transfer returns (Status),
the even all-to-all's algorithm numbers (AllToAllAlgorithm) and the collective codes of the
arrival header (Collective).

The C helpers use the same numbers under the same names: TC_STATUS_<NAME> and
TC_A2A_<NAME> in native/src/tc_internal.h, exposed by the extension as the dicts
comms.kernels._native.STATUS and A2A_ALGORITHMS (tests/unit/test_status.py checks they agree).
"""
from __future__ import annotations

import enum


@enum.unique
class Status(enum.IntEnum):
    """What the data-path helpers (C and their numpy twins) return as their first value."""

    READ_FAILED = -2       # a direct read failed: st <= READ_FAILED carries errno READ_FAILED - st
    NO_MEMORY = -1         # a C allocation failed (the bindings raise MemoryError instead)
    OK = 0                 # done
    TIMEOUT = 1            # a peer did not respond within the timeout (idx: that peer)
    ABORTED = 2            # a peer set its abort flag (idx: that peer)
    DEAD = 3               # a peer's process is gone (idx: that peer)
    MISMATCH = 4           # arrival headers disagree, or a TCP frame is not the one expected
    OTHER_ALGORITHM = 5    # even all-to-all: rank 0 runs an algorithm this call does not (no data moved)
    CLOSED = 6             # a TCP peer closed or reset its socket (it died or aborted)
    ERRNO = 7              # a socket call failed (the errno comes with the status)
    INTERRUPTED = 9        # SIGINT ended the wait and Python's handler did not raise

    @staticmethod
    def read_failed(err: int) -> int:
        """The status that reports a failed direct read with errno `err` (> 0)."""
        return Status.READ_FAILED - err

    @staticmethod
    def read_errno(st: int) -> int:
        """The errno a status st <= READ_FAILED carries."""
        return Status.READ_FAILED - st


@enum.unique
class AllToAllAlgorithm(enum.IntEnum):
    """The even all-to-all's algorithms by the number a rank proposes in its arrival header
    (the root word); every rank runs the one rank 0 proposed, or PAIRED when any rank
    proposed it."""

    PAIRWISE = 0           # pairwise rounds through the shared-memory slots
    DIRECT = 1             # each rank reads its blocks from the peers' buffers
    STAGED = 2             # through the data areas (Python only: the C call answers OTHER_ALGORITHM)
    PAIRWISE_STREAMED = 3  # pairwise rounds with streamed (non-temporal) slot writes
    PAIRED = 4             # pairwise rounds in pairs (n even): a rank whose send is its recv
                           # proposes it and every rank runs it (no copy aside)

    @property
    def label(self) -> str:
        """The name the selector and TOPOCOMM_ALGO use ("pairwise-streamed")."""
        return self.name.lower().replace("_", "-")

    @classmethod
    def by_label(cls, label: str) -> "AllToAllAlgorithm":
        return cls[label.upper().replace("-", "_")]

    @classmethod
    def agreed(cls, proposals) -> int:
        """The algorithm every rank runs, from every rank's proposal in rank order (what
        native/src/module.c alltoall_even_g does): PAIRED when any rank proposed it, else
        rank 0's."""
        return cls.PAIRED if cls.PAIRED in list(proposals)[1:] else proposals[0]


@enum.unique
class Collective(enum.IntEnum):
    """The collective a rank announces in its arrival header (word H_COLL)."""

    ALLREDUCE = 1
    BROADCAST = 2
    REDUCE = 3
    ALLGATHER = 4
    REDUCE_SCATTER = 5
    ALL_TO_ALL = 6
    GATHER = 7
    SCATTER = 8
    BARRIER = 9

    @property
    def label(self) -> str:
        """The collective's API name ("all_to_all")."""
        return self.name.lower()
