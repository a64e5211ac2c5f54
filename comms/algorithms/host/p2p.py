"""send / recv between two ranks, through a mailbox per (sender, receiver) pair.

    steps, per piece (a piece fills at most one mailbox):
      sender: wait until the receiver acked the previous piece, copy the piece and its
              header (length, tag) into its mailbox for that receiver, bump sent[dst]
      receiver: wait for sent[src], check length and tag, copy out, bump acked[src]
    Messages between a pair are matched in order; a tag or size mismatch is an error.
    Pair counters are independent of collectives, so send/recv may interleave with them.
    bytes: every byte is copied twice (into the mailbox, out of it), plus a 64-byte header
    per piece; a piece is at most the mailbox (64 KiB) minus the header.
    latency: per piece one hand-off each way (sent, then acked); pieces of one message do
    not overlap, since a pair has one mailbox.
    applies: two ranks of one host (shm/threads), any size; the only send/recv path there.
    best for: small and medium messages (control data, pipeline activations); a large
    message pays a round trip per 64 KiB.
"""
from __future__ import annotations

import ctypes

from comms.core.errors import MessageMismatch


_HDR = 64  # bytes of header at the start of each mailbox


class P2P:
    def __init__(self, ctx):
        self.ctx = ctx
        self.sent = [0] * ctx.size    # pieces I sent to each peer
        self.recvd = [0] * ctx.size   # pieces I received from each peer

    def _wait(self, addr_owner, off, target, what):
        ctx = self.ctx
        addrs = tuple(ctx.seg[q] + off if q == addr_owner else 0 for q in range(ctx.size))
        st, idx = ctx.nat.wait_all(addrs, target, ctx.aborts, ctx.pids, ctx.waiters, ctx.timeout)
        if st:
            ctx.fail(st, idx, what)

    def send(self, addr, nbytes, dst, tag):
        ctx, lay = self.ctx, self.ctx.layout
        cap = lay.p2p_bytes - _HDR
        box = ctx.seg[ctx.rank] + lay.p2p_box(dst)
        num = max(1, -(-nbytes // cap))
        for i in range(num):
            lo = i * cap
            m = min(cap, nbytes - lo)
            s = self.sent[dst] + 1
            if s > 1:  # the receiver must have taken the previous piece
                self._wait(dst, lay.p2p_acked(ctx.rank), s - 1, f"send to rank {dst}")
            hdr = (ctypes.c_int64 * 4).from_address(box)
            hdr[0], hdr[1], hdr[2], hdr[3] = nbytes, tag, i, m
            if m:
                ctx.nat.copy(box + _HDR, addr + lo, m)
            ctx.nat.post(ctx.seg[ctx.rank] + lay.p2p_sent(dst), s, ctx.waiters[ctx.rank])
            self.sent[dst] = s

    def recv(self, addr, nbytes, src, tag):
        ctx, lay = self.ctx, self.ctx.layout
        cap = lay.p2p_bytes - _HDR
        box = ctx.seg[src] + lay.p2p_box(ctx.rank)
        num = max(1, -(-nbytes // cap))
        for i in range(num):
            s = self.recvd[src] + 1
            self._wait(src, lay.p2p_sent(ctx.rank), s, f"recv from rank {src}")
            hdr = (ctypes.c_int64 * 4).from_address(box)
            total, their_tag, m = hdr[0], hdr[1], hdr[3]
            if i == 0 and (total != nbytes or their_tag != tag):
                ctx.abort(f"recv mismatch from rank {src}")
                raise MessageMismatch(f"recv: rank {src} sent {total} bytes with tag {their_tag}, "
                                      f"but this recv expects {nbytes} bytes with tag {tag}; "
                                      "the group is broken")
            if m:
                ctx.nat.copy(addr + i * (lay.p2p_bytes - _HDR), box + _HDR, m)
            ctx.nat.post(ctx.seg[ctx.rank] + lay.p2p_acked(src), s, ctx.waiters[ctx.rank])
            self.recvd[src] = s
