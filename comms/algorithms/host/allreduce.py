"""All-reduce, reduce and reduce-scatter on one host, through each rank's shared segment.
Two functions; comms/plan/select.py picks one per call (algorithms "small" and "ring").

small_allreduce (latency path; all-reduce and reduce)
    steps: the arrival and the data are one C call (tc_allreduce_small): wait until every
    peer arrived at op k-1 (so this op's small slot, one of two alternating by op id, was
    last read by op k-2 and is free); copy my whole input into my slot with my arrival
    header; post ARRIVED; wait for all; check the headers agree; reduce all n slots in rank
    order into my output (every rank gets the same bits; a reduce's non-root ranks write a
    scratch buffer; AVG is a SUM scaled by 1/n).
    bytes per rank: N copied in; n x N read and N written by the reduction.
    latency: one arrival (one cache-line round trip) + the reduction of n x N bytes.
    applies: N <= the small slot (64 KiB) and n x N <= 256 KiB (SMALL_ALLREDUCE_MAX_BYTES,
    SMALL_ALLREDUCE_READ_BYTES in comms/plan/select.py).
    best for: latency-bound sizes, up to the model's crossover with ring (64 KiB with 2
    ranks on 2 cores, 32 KiB with 8 ranks: tests/unit/golden/selection.txt).

ring_reduce (bandwidth path; all-reduce, reduce, and reduce-scatter without its gather stage;
called ring because each rank owns one block, as in a ring reduce-scatter, but every rank
reads the peers' blocks directly from shared memory; ring_params sizes blocks and chunks)
    steps: the arrival (every rank publishes its input's page offset, which the slots copy so
    that copies keep their alignment); then one C call (tc_ring_reduce) runs, per chunk c,
    pipelined through NUM_SLOTS slots of the data area, whichever stage has its inputs:
      1. once every peer is DONE with the chunk that last used the slot: copy the parts of
         my input chunk that other ranks own into my slot; post POSTED
      2. wait for all POSTED; reduce my block's chunk straight from the peers' slots and my
         own input (rank order, so every element is computed once and identically), write it
         to my output and (with the gather) to my slot; post REDUCED (reduce-scatter: DONE)
      3. (all-reduce, reduce) wait for all REDUCED; copy each peer's reduced chunk out of its
         slot into my output; post DONE
    bytes per rank: (n-1)/n N copied in, N read + N/n written by the reduction (x2 stores
    with the gather), (n-1)/n N copied out. No byte is copied twice.
    one call: an all-reduce or reduce-scatter of a size run before takes the arrival and the
    stages in one C call (tc_ring_once) with the block and chunk computed then (ring_plan).
    latency: one arrival + 2-3 counter hand-offs per chunk, overlapped across ranks.
    applies: any size; the only algorithm of reduce-scatter.
    best for: everything above the small crossover (bandwidth-bound); the chunk is the cost
    model's (comms/plan/cost.py CHUNK_L2_SLOTS: the slots should fit two L2 caches).
"""
from __future__ import annotations

from comms.core import dtypes as dt
from comms.core import layout as L
from comms.core.context import COLL_CODES
from comms.core.errors import CommError
from comms.core.status import Status

NUM_SLOTS = 4
DEFAULT_CHUNK_BYTES = 256 << 10
_RING_CTRL = (L.POSTED, L.REDUCED, L.DONE, L.ABORT, L.WAITERS)


def small_allreduce(ctx, in_addr, out_addr, count, dtype, op, avg_n, coll="allreduce", root=-1):
    st, idx = ctx.nat.allreduce_small_g(ctx.group, ctx.op_id, COLL_CODES[coll], root, in_addr,
                                        out_addr, count, dtype, op, avg_n)
    if st == Status.MISMATCH:
        ctx.check_headers(COLL_CODES[coll])
        raise ValueError(f"{coll}: ranks disagree on their arguments")  # not reached
    if st:
        ctx.fail(st, idx, coll)


def ring_fit(data_bytes: int, num_ranks: int) -> int:
    """The largest chunk whose NUM_SLOTS x num_ranks blocks (each a chunk plus a page of
    padding) fit a data area of data_bytes (the cost model picks chunks under it)."""
    return data_bytes // (NUM_SLOTS * num_ranks) - 4096


def ring_params(ctx, count, dtype, block_elems=None, chunk_bytes=DEFAULT_CHUNK_BYTES):
    n, es = ctx.size, dt.DTYPE_SIZES[dtype]
    if block_elems is None:
        block_elems = -(-count // n)
        align = max(1, 64 // es)
        block_elems = -(-block_elems // align) * align
    fit = ring_fit(ctx.layout.data_bytes, n)
    if fit < 64:
        raise CommError(f"ring all-reduce: the shared data area ({ctx.layout.data_bytes} B) "
                        f"cannot hold {NUM_SLOTS} slots of {n} blocks of at least 64 B plus "
                        f"a page each (needs {NUM_SLOTS * n * (4096 + 64)} B)")
    chunk_bytes = max(64, min(chunk_bytes, fit) // 64 * 64)
    chunk_elems = max(1, chunk_bytes // es)
    block_stride = chunk_elems * es + 4096
    slot_stride = n * block_stride
    return block_elems, chunk_elems, block_stride, slot_stride


def ring_reduce(ctx, in_addr, out_addr, count, dtype, op, avg_n, do_gather, coll, root=-1,
                block_elems=None, chunk_bytes=DEFAULT_CHUNK_BYTES):
    k = ctx.op_id
    ctx.arrive(COLL_CODES[coll], count, dtype, op, root, 0, in_addr % 4096)
    pads = tuple(int(h[L.H_EXTRA]) for h in ctx.headers)
    block_elems, chunk_elems, block_stride, slot_stride = ring_params(
        ctx, count, dtype, block_elems, chunk_bytes)
    st, idx = ctx.nat.ring_reduce_g(
        ctx.group, _RING_CTRL, ctx.data_off, k, in_addr, out_addr, count, block_elems, dtype, op,
        chunk_elems, NUM_SLOTS, slot_stride, block_stride, pads, 1 if do_gather else 0, avg_n)
    if st:
        ctx.fail(st, idx, coll)


def ring_plan(ctx, coll, count, dtype, block_elems=None, chunk_bytes=DEFAULT_CHUNK_BYTES):
    """What ring_once needs for an all-reduce or a reduce-scatter (`coll`, block_elems: each
    rank's share) of `count` elements of `dtype`: one tuple, computed once per size."""
    block_elems, chunk_elems, block_stride, slot_stride = ring_params(
        ctx, count, dtype, block_elems, chunk_bytes)
    return (COLL_CODES[coll], block_elems, chunk_elems, NUM_SLOTS, slot_stride, block_stride,
            1 if coll == "allreduce" else 0)


def ring_once(ctx, in_addr, out_addr, count, dtype, op, avg_n, plan):
    """ring_reduce in one C call, arrival included (the plan from ring_plan): the same header
    words as the two-call path, so peers on it meet this one. (status, idx)."""
    coll, block_elems, chunk_elems, num_slots, slot_stride, block_stride, gather = plan
    return ctx.nat.ring_once_g(ctx.group, ctx.op_id, coll, in_addr, out_addr, count, dtype, op,
                               avg_n, _RING_CTRL, ctx.data_off, block_elems, chunk_elems,
                               num_slots, slot_stride, block_stride, gather)
