"""Direct reads: every rank copies what it needs straight out of the peers' own buffers,
one copy per byte, no staging. Broadcast, all-gather, gather, scatter, all-to-all.

    steps: arrival publishes each rank's buffer address (and split counts); every puller
    reads its pieces from the publishers (process_vm_readv between processes, memcpy between
    threads), then posts DONE; publishers wait for their pullers' DONE before returning,
    since the pullers read the publishers' user buffers.
    bytes: each byte crosses once (staged: twice).
    latency: one arrival + one DONE hand-off; the reads of one call are one C call.
    applies: when the transport can read peers' memory (transport.direct); else staged.py.
    A buffer that is both read by peers and written by its owner in the same call
    (in-place all-to-all) is first copied aside.
    best for: small broadcasts and all-gathers (one hand-off fewer than staged) and buffers
    larger than the L3 (one copy per byte instead of two); in between staged's cached copies
    beat process_vm_readv, which also slows down with more ranks than cores
    (comms/plan/cost.py CMA_GBS, CMA_CONTENTION). For all-to-all: DRAM-bound sizes, where
    the model leaves pairwise.
"""
from __future__ import annotations

import itertools

from comms.core import layout as L


def read_many(ctx, reads):
    """reads: [(peer, local_addr, remote_addr, nbytes)] -> all done, or an error raised."""
    reads = [r for r in reads if r[3]]
    if not reads:
        return
    if ctx.transport.direct == "memcpy":
        for _, loc, rem, n in reads:
            ctx.nat.copy(loc, rem, n)
        return
    err = ctx.nat.cma_read_many([ctx.pids[q] for q, *_ in reads], [r[1] for r in reads],
                                [r[2] for r in reads], [r[3] for r in reads])
    if err:
        read_failed(ctx, err)


def read_failed(ctx, err):
    from comms.core.errors import CommError
    ctx.abort(f"process_vm_readv failed: errno {err}")
    raise CommError(f"reading a peer's buffer failed (errno {err}); set "
                    "TOPOCOMM_ALGO=<collective>:staged to avoid direct reads")


def finish(ctx, pullers):
    """I am done reading; wait until everyone reading my buffer is done too."""
    k = ctx.op_id
    ctx.post(L.DONE, L.tag(k, 1))
    if pullers:
        ctx.wait(L.DONE, L.tag(k, 1), only=pullers, what="direct copy")


def addresses(ctx):
    return [int(h[L.H_EXTRA]) for h in ctx.headers]  # what each rank published at arrival


def broadcast(ctx, addr, nbytes, root):
    me = ctx.rank
    if me != root:
        read_many(ctx, [(root, addr, addresses(ctx)[root], nbytes)])
    finish(ctx, set(range(ctx.size)) - {root} if me == root else ())


def allgather(ctx, saddr, raddr, block, root=None):
    me, n = ctx.rank, ctx.size
    addrs = addresses(ctx)
    if root is None or root == me:
        ctx.nat.copy(raddr + me * block, saddr, block)
        read_many(ctx, [(q, raddr + q * block, addrs[q], block) for q in range(n) if q != me])
    if root is None:
        pullers = set(range(n)) - {me}
    else:
        pullers = {root} if me != root else ()
    finish(ctx, pullers)


def scatter(ctx, saddr, raddr, block, root):
    me = ctx.rank
    if me == root:
        ctx.nat.copy(raddr, saddr + root * block, block)
    else:
        read_many(ctx, [(root, raddr, addresses(ctx)[root] + me * block, block)])
    finish(ctx, set(range(ctx.size)) - {root} if me == root else ())


def all_to_all(ctx, saddr, raddr, send_bytes, recv_bytes, all_send_bytes):
    n, me = ctx.size, ctx.rank
    addrs = addresses(ctx)
    rdispl = [0] + list(itertools.accumulate(recv_bytes))[:-1]
    reads = []
    for q in range(n):
        m = recv_bytes[q]
        # where my block sits in q's send buffer: after what q sends to ranks before me
        off = sum(all_send_bytes[q][:me])
        if q == me:
            ctx.nat.copy(raddr + rdispl[me], saddr + off, m)
        else:
            reads.append((q, raddr + rdispl[q], addrs[q] + off, m))
    read_many(ctx, reads)
    finish(ctx, [q for q in range(n) if q != me and all_send_bytes[me][q]] or ())
