"""All-reduce and reduce-scatter on one host, through each rank's shared segment.

SmallAllreduce (latency path)
    steps: every rank copies its whole input into its small slot (two slots alternate by
    op id, so no release handshake is needed), posts ARRIVED, waits for all, then reduces
    all n slots in rank order into its output.
    bytes: each rank reads n x N; wire (memory) traffic n x N per rank.
    latency: one arrival (one cache-line round trip) + n x N / reduce bandwidth.
    applies: N <= the small slot (64 KiB); best below ~16 KiB.

RingReduce (bandwidth path; called ring because each rank owns one block, as in a ring
reduce-scatter, but every rank reads the peers' blocks directly from shared memory)
    steps, per chunk c (pipelined through num_slots slots of the data area):
      1. copy the parts of my input chunk that other ranks own into my slot; post POSTED
      2. wait for all POSTED; reduce my block's chunk straight from the peers' slots and my
         own input (rank order, so every element is computed once and identically), write it
         to my output and to my slot; post REDUCED
      3. (all-reduce only) wait for all REDUCED; copy each peer's reduced chunk out of its
         slot into my output; post DONE
    bytes per rank: (n-1)/n N copied in, N read + N/n written by the reduction (x2 stores),
    (n-1)/n N copied out. No byte is copied twice.
    latency: 2-3 counter hand-offs per chunk, overlapped across ranks.
    applies: any size; chosen above the small threshold.
"""
from __future__ import annotations

from comms.core import dtypes as dt
from comms.core import layout as L
from comms.core.context import COLL_CODES, MISMATCH

NUM_SLOTS = 4
DEFAULT_CHUNK_BYTES = 256 << 10
_RING_CTRL = (L.POSTED, L.REDUCED, L.DONE, L.ABORT, L.WAITERS)


def small_allreduce(ctx, in_addr, out_addr, count, dtype, op, avg_n, coll="allreduce", root=-1):
    st, idx = ctx.nat.allreduce_small_g(ctx.group, ctx.op_id, COLL_CODES[coll], root, in_addr,
                                        out_addr, count, dtype, op, avg_n)
    if st == MISMATCH:
        ctx.check_headers(COLL_CODES[coll])
        raise ValueError(f"{coll}: ranks disagree on their arguments")  # not reached
    if st:
        ctx.fail(st, idx, coll)


def ring_params(ctx, count, dtype, block_elems=None, chunk_bytes=DEFAULT_CHUNK_BYTES):
    n, es = ctx.size, dt.DTYPE_SIZES[dtype]
    if block_elems is None:
        block_elems = -(-count // n)
        align = max(1, 64 // es)
        block_elems = -(-block_elems // align) * align
    fit = ctx.layout.data_bytes // (NUM_SLOTS * n) - 4096
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
