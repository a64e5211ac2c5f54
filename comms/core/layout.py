"""Byte layout of one rank's segment (shared memory or, for the threads transport, plain memory).

Every rank owns one segment and writes only into its own; peers read it. Counters are
monotonic uint64 values on separate cache lines so a writer never waits for a reader's
cache line. The same layout is used by the C helpers (native/src/sync.c, allreduce.c):
offsets here are passed to C, not duplicated there.

    [ ctrl page | p2p counters | meta | small[0] | small[1] | p2p mailboxes | data ]
"""
from __future__ import annotations

from dataclasses import dataclass

PAGE = 4096
LINE = 64

# ctrl page: one counter per cache line
ARRIVED = 0 * LINE      # op id of this rank's latest arrival at a collective
POSTED = 1 * LINE       # (op id << 32 | step) data of that step is in my data area
REDUCED = 2 * LINE      # (op id << 32 | step) my reduced slice of that step is in my data area
DONE = 3 * LINE         # (op id << 32 | step) I finished reading peers' data of that step
ABORT = 4 * LINE        # nonzero: this rank failed mid-collective; peers must stop waiting
PID = 5 * LINE          # process id, to tell a dead peer from a slow one
WAITERS = 6 * LINE      # number of peers sleeping on one of my counters (futex wake needed)
WAKE_SEQ = 7 * LINE     # uint32 bumped by every post: the futex word sleepers wait on (sync.c)
HEADER = 8 * LINE       # two headers of NUM_HEADER_WORDS int64 (alternating by op id parity):
NUM_HEADER_WORDS = 16   # what this rank asked for; a peer may still be checking the previous op's
CTRL_BYTES = PAGE



def header(parity: int) -> int:
    return HEADER + parity * NUM_HEADER_WORDS * 8


# header words
# H_TIME: CLOCK_MONOTONIC ns of the arrival (who came last: native/src/tc_internal.h tc_stats)
H_OP_ID, H_COLL, H_COUNT, H_DTYPE, H_OP, H_ROOT, H_TIME, H_ERROR, H_EXTRA = range(9)

STEP_BITS = 32


def tag(op_id: int, step: int) -> int:
    """Counter value meaning 'step `step` of op `op_id` reached'; grows across ops."""
    return (op_id << STEP_BITS) | step


@dataclass(frozen=True)
class SegmentLayout:
    """Offsets are computed from the sizes; hot paths read the few they need once
    (Context caches them)."""
    world_size: int
    small_bytes: int = 64 << 10      # one small-message slot (two of them, alternating by op id)
    p2p_bytes: int = 64 << 10        # mailbox per destination peer for send/recv
    data_bytes: int = 32 << 20       # staging area for large collectives

    @property
    def p2p_ctrl(self) -> int:
        return CTRL_BYTES

    @property
    def p2p_ctrl_bytes(self) -> int:
        # sent[peer] then acked[peer], one cache line each
        return _round_up(2 * self.world_size * LINE, PAGE)

    def p2p_sent(self, peer: int) -> int:
        return self.p2p_ctrl + peer * LINE

    def p2p_acked(self, peer: int) -> int:
        return self.p2p_ctrl + (self.world_size + peer) * LINE

    @property
    def meta(self) -> int:
        return self.p2p_ctrl + self.p2p_ctrl_bytes

    @property
    def meta_bytes(self) -> int:
        # two parities x all-to-all send and recv counts (2 x world_size int64)
        return _round_up(2 * self.meta_half, PAGE)

    @property
    def meta_half(self) -> int:
        return _round_up(2 * 8 * self.world_size, LINE)

    def meta_at(self, parity: int) -> int:
        return self.meta + parity * self.meta_half

    def small(self, parity: int) -> int:
        return self.meta + self.meta_bytes + parity * self.small_bytes

    def p2p_box(self, peer: int) -> int:
        return self.small(2) + peer * self.p2p_bytes

    @property
    def data(self) -> int:
        return _round_up(self.p2p_box(self.world_size), PAGE)

    @property
    def total_bytes(self) -> int:
        return self.data + self.data_bytes


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m
