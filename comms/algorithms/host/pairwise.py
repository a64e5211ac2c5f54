"""Pairwise all-to-all through the shared data areas, pipelined in chunks (one C call).

    steps: copy my own block locally; then for round r = 1..n-1 send to (rank + r) and
    receive from (rank - r) (paired, n even: exchange with one partner per round, a
    round-robin tournament, which also runs in place): my data area is a ring of num_slots chunks; I copy my chunks
    for dst into it as slots free up (dst's DONE), and copy src's chunks out of src's ring
    as they appear (src's POSTED). Both directions run interleaved, so a chunk is written
    and read while it is still in cache.
    bytes: each byte is copied twice, but through cache-resident slots: memory traffic is
    one read of the send buffer and one write of the receive buffer.
    latency: one arrival + one counter hand-off per chunk, overlapped.
    applies: one host (shm/threads), world size <= 1024 (the round is 10 bits of a counter).
    best for: all-to-all from 8 B up to a few MiB (the model's choice; from 512 KiB between
    processes rank 0 measures it against direct, or without direct reads its cached against
    its streamed slot writes: comms/plan/select.py Measured); above that, once DRAM-bound,
    direct.
"""
from __future__ import annotations

import itertools

from comms.core import layout as L

NUM_SLOTS = 4
CHUNK_BYTES = 256 << 10


CTRL = (L.POSTED, L.DONE, L.ABORT, L.WAITERS)


def chunk_for(data_bytes: int) -> int:
    """The chunk of each round's slot copies for a data area of data_bytes: CHUNK_BYTES,
    or less where NUM_SLOTS of them do not fit (the cost model uses the same rule)."""
    return max(64, min(CHUNK_BYTES, data_bytes // NUM_SLOTS) // 64 * 64)


def chunk_bytes(ctx):
    return chunk_for(ctx.layout.data_bytes)


# flags of the C call (native/src/tc_internal.h)
STREAM_IN, PAIRED = 1, 2


def all_to_all(ctx, saddr, raddr, send_bytes, recv_bytes, all_send_bytes, stream_in=False,
               paired=False):
    """stream_in: write my slots with non-temporal stores (the peer then reads them from
    memory, not from my core's cache); the host group measures it against the cached
    writes where a group has no direct reads (comms/api/host.py HostGroup._a2a_plan).
    paired (n even): round r's partner is both the rank I send to and the one I receive
    from (a round-robin tournament), and a chunk received lands only after the chunk sent
    from the same place went into my slots: send may be recv (in place, no copy aside)."""
    chunk = chunk_bytes(ctx)
    sdispl = [0, *itertools.accumulate(send_bytes)][:-1]
    rdispl = [0, *itertools.accumulate(recv_bytes)][:-1]
    st, idx = ctx.nat.alltoall_pairwise(ctx.group, CTRL, ctx.data_off, ctx.op_id, saddr, raddr,
                                        sdispl, send_bytes, rdispl, recv_bytes, chunk, NUM_SLOTS,
                                        (STREAM_IN if stream_in else 0) | (PAIRED if paired else 0))
    if st:
        ctx.fail(st, idx, "all_to_all")

