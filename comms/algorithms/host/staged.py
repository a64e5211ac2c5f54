"""Staged copies through each rank's data area: broadcast, all-gather, gather, scatter,
all-to-all (even, uneven and zero splits).

    steps, per round j (a round moves at most the data area's size per publisher):
      1. publishers wait until every puller finished round j-1 (DONE), copy their pieces for
         round j into their own data area, post POSTED
      2. pullers wait for the publishers they need, copy their pieces out, post DONE
    bytes: every byte is copied twice (into the publisher's area, out of it), once if it
    stays on the rank (a local copy). Rounds = ceil(largest piece / area share).
    latency: one arrival + 2 counter hand-offs per round.
    applies: one host (shm) and tests (threads). Each call's per-byte work runs in C.
    best for: sizes whose staged copies stay in cache (broadcast / all-gather around 1 MiB
    with 2 ranks), large rooted collectives with many ranks (direct reads contend), and
    groups that cannot read peers' memory (TOPOCOMM_CMA=0, process_vm_readv refused).
"""
from __future__ import annotations

import itertools

from comms.core import layout as L

_ALIGN = 64


def run_rounds(ctx, num_rounds, publishers, pullers, publish, pull):
    k, me = ctx.op_id, ctx.rank
    for j in range(num_rounds):
        if me in publishers:
            if j > 0:
                ctx.wait(L.DONE, L.tag(k, j), only=pullers, what="staged copy")
            publish(j)
            ctx.post(L.POSTED, L.tag(k, j + 1))
        if me in pullers:
            ctx.wait(L.POSTED, L.tag(k, j + 1), only=publishers, what="staged copy")
            pull(j)
        ctx.post(L.DONE, L.tag(k, j + 1))


def _piece(total, j, size):
    lo = j * size
    return lo, max(0, min(size, total - lo))


def broadcast(ctx, addr, nbytes, root):
    D = ctx.layout.data_bytes
    area = ctx.seg[root] + ctx.layout.data
    cp = ctx.nat.copy
    others = set(range(ctx.size)) - {root}

    def publish(j):
        lo, m = _piece(nbytes, j, D)
        cp(area, addr + lo, m)

    def pull(j):
        lo, m = _piece(nbytes, j, D)
        cp(addr + lo, area, m)

    run_rounds(ctx, -(-nbytes // D), {root}, others, publish, pull)


def allgather(ctx, saddr, raddr, block, root=None):
    """All-gather (root None) or gather to root: rank q's block lands at raddr + q*block."""
    D = ctx.layout.data_bytes
    me, n, cp = ctx.rank, ctx.size, ctx.nat.copy
    if root is None or root == me:
        cp(raddr + me * block, saddr, block)
    everyone = set(range(n))
    publishers = everyone if root is None else everyone - {root}
    pullers = everyone if root is None else {root}
    areas = [b + ctx.layout.data for b in ctx.seg]

    def publish(j):
        lo, m = _piece(block, j, D)
        cp(areas[me], saddr + lo, m)

    def pull(j):
        lo, m = _piece(block, j, D)
        for q in publishers:
            if q != me and m:
                cp(raddr + q * block + lo, areas[q], m)

    run_rounds(ctx, -(-block // D), publishers, pullers, publish, pull)


def scatter(ctx, saddr, raddr, block, root):
    n, me, cp = ctx.size, ctx.rank, ctx.nat.copy
    if me == root:
        cp(raddr, saddr + root * block, block)
    if n == 1:
        return
    share = ctx.layout.data_bytes // (n - 1) // _ALIGN * _ALIGN
    area = ctx.seg[root] + ctx.layout.data
    others = set(range(n)) - {root}

    def region(q):
        return area + (q if q < root else q - 1) * share

    def publish(j):
        lo, m = _piece(block, j, share)
        for q in others:
            if m:
                cp(region(q), saddr + q * block + lo, m)

    def pull(j):
        lo, m = _piece(block, j, share)
        if m:
            cp(raddr + lo, region(me), m)

    run_rounds(ctx, -(-block // share), {root}, others, publish, pull)


def all_to_all(ctx, saddr, raddr, send_bytes, recv_bytes, all_send_bytes):
    """send_bytes[q]: what I send to q; recv_bytes[q]: what I receive from q;
    all_send_bytes[p][q]: the full matrix (checked consistent by the caller)."""
    n, me, cp = ctx.size, ctx.rank, ctx.nat.copy
    sdispl = [0] + list(itertools.accumulate(send_bytes))[:-1]
    rdispl = [0] + list(itertools.accumulate(recv_bytes))[:-1]
    cp(raddr + rdispl[me], saddr + sdispl[me], int(send_bytes[me]))
    if n == 1:
        return
    share = ctx.layout.data_bytes // (n - 1) // _ALIGN * _ALIGN
    largest = max((int(all_send_bytes[p][q]) for p in range(n) for q in range(n) if p != q),
                  default=0)
    areas = [b + ctx.layout.data for b in ctx.seg]
    sb, rb = [int(x) for x in send_bytes], [int(x) for x in recv_bytes]

    def region(owner, dest):
        return areas[owner] + (dest if dest < owner else dest - 1) * share

    def publish(j):
        for q in range(n):
            if q != me:
                lo, m = _piece(sb[q], j, share)
                if m:
                    cp(region(me, q), saddr + sdispl[q] + lo, m)

    def pull(j):
        for q in range(n):
            if q != me:
                lo, m = _piece(rb[q], j, share)
                if m:
                    cp(raddr + rdispl[q] + lo, region(q, me), m)

    everyone = set(range(n))
    run_rounds(ctx, -(-largest // share), everyone, everyone, publish, pull)
