"""Collectives for groups that span hosts: shared memory inside each host (the host's own
group, `mh.local`: comms/api/host.py HostGroup), TCP between hosts (`mh.mesh`). `mh` is the
multi-host group (comms/api/multihost.py MultiHostGroup), never a Communicator. H hosts, L ranks on a host,
N bytes per rank; "link" below is one host's network link.

allreduce_hierarchical (hosts with equal rank counts):
    steps: reduce-scatter inside the host (shm) -> every local rank all-reduces its own
    1/L shard with the ranks of the same local index on the other hosts (TCP: a plain
    exchange for 2 hosts, else a ring) -> all-gather inside the host (shm); in up to 8
    pieces, so the shm steps of one piece overlap the network step of another.
    bytes on the link: 2(H-1)/H x N per host each way, whatever the placement of ranks:
    the L shards cross it in parallel, each once. latency: 2 shm collectives + 2(H-1) TCP
    steps (1 for H = 2). best: large messages, any placement (contiguous or interleaved).
allreduce_leaders (any layout, e.g. 3+2+1 ranks):
    steps: reduce to the host's first rank (shm) -> leaders all-reduce (TCP, as above) ->
    broadcast inside the host. bytes on the link: 2(H-1)/H x N each way, from one rank.
    latency: 2 shm collectives + 1 or 2(H-1) TCP steps. best: small messages, uneven hosts.
broadcast / reduce / gather / scatter / allgather: through one representative per host (the
    root on its own host, the host's first rank elsewhere): a shm collective inside each
    host, one TCP transfer per host pair. bytes on the link: N per host (x L for the
    gather-like ones), latency: 2 shm steps + 1 TCP step.
all_to_all_2d (hierarchical): one TCP frame per host pair, between the hosts' first ranks,
    around two shm all-to-alls inside each host (see the function); best for small blocks.
all_to_all_pairwise: blocks for every remote rank as direct TCP transfers, all at once
    (one poll loop on the network thread), so the link is busy from the first byte, while
    the blocks for ranks on this host go through the host's shm all-to-all.
    bytes on the link: the remote blocks, once.
reduce_scatter: an all-reduce, then each rank keeps its block (2x the minimal link bytes;
    a hierarchical reduce-scatter is future work).

Every floating-point reduction runs in one order that every rank shares (each element is
reduced once along one chain, then copied), so all ranks get identical bits.
"""
from __future__ import annotations

import numpy as np

from comms.core import dtypes as dt
from comms.core.buffers import Buf
from comms.kernels import native


def _tmp(mh, nbytes):
    """A temporary for this call: a block of the group's cache (comms/core/memory.py), so a
    collective repeated every few seconds does not fault its temporaries in again."""
    return mh.temps.empty(max(int(nbytes), 1))


def blocks(count, parts):
    """Balanced partition of `count` elements: [(lo, n)] for `parts` parts."""
    base, extra = divmod(count, parts)
    out, lo = [], 0
    for i in range(parts):
        n = base + (1 if i < extra else 0)
        out.append((lo, n))
        lo += n
    return out


# ---- between hosts: one rank per host ------------------------------------------------------
def is_power_of_two(h):
    return h > 0 and h & (h - 1) == 0


def host_ring(mh, local_rank):
    """One rank per host (the one with this local index), hosts in ring order: each next
    host the closest to the previous one by the topology's path kind (same switch before
    routed network), so a ring crosses the slowest links the fewest times."""
    reps = [hs[min(local_rank, len(hs) - 1)] for hs in mh.hosts]
    topo = getattr(mh, "topology", None)
    if topo is None or len(reps) <= 2:
        return reps
    order, left = [reps[0]], reps[1:]
    while left:
        last = order[-1]
        nxt = min(left, key=lambda q: (int(topo.path_kind(last, q, gpu=False)), q))
        order.append(nxt)
        left.remove(nxt)
    return order


def net_allreduce(mh, ring, addr, count, dtype, op, step, method=None):
    """All-reduce `count` elements at addr among `ring` (one rank per host, this rank in it)
    over TCP: a plain exchange for 2 hosts; recursive halving-doubling (2 log2 H steps) when
    H is a power of two and `method` allows; else a ring (2 (H-1) steps). The same bytes
    cross each link either way: (H-1)/H x N each way per phase. Returns the next free step."""
    H = len(ring)
    if H == 1 or count == 0:
        return step + 2 * H
    if H > 2 and is_power_of_two(H) and method in (None, "halving_doubling"):
        return _net_halving_doubling(mh, ring, addr, count, dtype, op, step)
    es = dt.DTYPE_SIZES[dtype]
    i = ring.index(mh.rank)
    nat = mh.nat
    if H == 2:
        peer = ring[1 - i]
        tmp = _tmp(mh, count * es)
        t = native.addr(tmp)
        mh.exchange([(peer, 0, addr, count * es, mh.tag(step)),
                     (peer, 1, t, count * es, mh.tag(step))], "allreduce")
        srcs = (addr, t) if i == 0 else (t, addr)  # the same order on both hosts
        nat.reduce(addr, srcs, count, dtype, op)
        return step + 2 * H
    nxt, prv = ring[(i + 1) % H], ring[(i - 1) % H]
    parts = blocks(count, H)
    tmp = _tmp(mh, max(n for _, n in parts) * es)
    t = native.addr(tmp)
    for s in range(H - 1):  # reduce-scatter: block b ends fully reduced on ring[b - 1]
        sb, rb = (i - s) % H, (i - s - 1) % H
        (slo, sn), (rlo, rn) = parts[sb], parts[rb]
        mh.exchange([(nxt, 0, addr + slo * es, sn * es, mh.tag(step + s)),
                     (prv, 1, t, rn * es, mh.tag(step + s))], "allreduce")
        nat.reduce(addr + rlo * es, (t, addr + rlo * es), rn, dtype, op)
    step += H - 1
    for s in range(H - 1):  # all-gather the reduced blocks
        sb, rb = (i + 1 - s) % H, (i - s) % H
        (slo, sn), (rlo, rn) = parts[sb], parts[rb]
        mh.exchange([(nxt, 0, addr + slo * es, sn * es, mh.tag(step + s)),
                     (prv, 1, addr + rlo * es, rn * es, mh.tag(step + s))], "allreduce")
    return step + H + 1


def _net_halving_doubling(mh, ring, addr, count, dtype, op, step):
    """Reduce-scatter by recursive halving, then all-gather by recursive doubling: at
    distance d the partner is i xor d; the rank with bit d clear keeps the lower half of
    its current block range. Rank i ends the halving owning block i, reduced once (lower
    ring position first), so every rank gets the same bits."""
    H = len(ring)
    es = dt.DTYPE_SIZES[dtype]
    i = ring.index(mh.rank)
    parts = blocks(count, H)
    # the largest half kept is the lower one: the first blocks are the larger ones
    tmp = _tmp(mh, sum(n for _, n in parts[:H // 2]) * es)
    t = native.addr(tmp)

    def span(lo_b, hi_b):
        lo = parts[lo_b][0]
        hi = parts[hi_b - 1][0] + parts[hi_b - 1][1]
        return lo, hi - lo

    lo_b, hi_b = 0, H
    d = H // 2
    k = 0
    while d >= 1:
        partner = ring[i ^ d]
        mid = (lo_b + hi_b) // 2
        keep, give = ((lo_b, mid), (mid, hi_b)) if not i & d else ((mid, hi_b), (lo_b, mid))
        (klo, kn), (glo, gn) = span(*keep), span(*give)
        mh.exchange([(partner, 0, addr + glo * es, gn * es, mh.tag(step + k)),
                     (partner, 1, t, kn * es, mh.tag(step + k))], "allreduce")
        srcs = (addr + klo * es, t) if not i & d else (t, addr + klo * es)
        mh.nat.reduce(addr + klo * es, srcs, kn, dtype, op)
        lo_b, hi_b = keep
        d //= 2
        k += 1
    d = 1
    while d < H:
        partner = ring[i ^ d]
        (mlo, mn) = span(lo_b, hi_b)
        width = hi_b - lo_b
        plo_b = lo_b + width if not i & d else lo_b - width
        (plo, pn) = span(plo_b, plo_b + width)
        mh.exchange([(partner, 0, addr + mlo * es, mn * es, mh.tag(step + k)),
                     (partner, 1, addr + plo * es, pn * es, mh.tag(step + k))], "allreduce")
        lo_b, hi_b = min(lo_b, plo_b), max(hi_b, plo_b + width)
        d *= 2
        k += 1
    return step + 2 * H + 2


# ---- all-reduce --------------------------------------------------------------------------
# pieces of the hierarchical all-reduce: the host's reduce-scatter of piece k+1 and
# all-gather of piece k-1 run while piece k crosses the network (on mh's network thread)
PIECE_MIN_BYTES = 4 << 20
MAX_PIECES = 8


def num_pieces(nbytes: int) -> int:
    """Pieces of a hierarchical all-reduce of nbytes (the cost model uses the same rule)."""
    return max(1, min(MAX_PIECES, int(nbytes) // PIECE_MIN_BYTES))


def allreduce_hierarchical(mh, in_addr, out_addr, count, dtype, op):
    L = mh.local.size
    es = dt.DTYPE_SIZES[dtype]
    num_pieces_ = num_pieces(count * es)
    pieces = [(lo, n) for lo, n in blocks(count, num_pieces_) if n] or [(0, 0)]
    method = mh.net_method(pieces[0][1] // L * es)
    ring = host_ring(mh, mh.local_rank)
    steps_per_piece = 2 * len(ring) + 2
    pending = []  # (future, shard, lo, n, padded_out or None)

    def finish(item):
        fut, shard, lo, n, tmp_out = item
        fut.result()
        shard_n = shard.nbytes // es
        dst = native.addr(tmp_out) if tmp_out is not None else out_addr + lo * es
        mh.local.allgather(Buf(native.addr(shard), shard_n, dtype, None),
                           Buf(dst, shard_n * L, dtype, None))
        if tmp_out is not None:
            mh.nat.copy(out_addr + lo * es, dst, n * es)

    for k, (lo, n) in enumerate(pieces):
        padded = -(-n // L) * L
        src, tmp_out = in_addr + lo * es, None
        keep = None
        if padded != n:  # the host's reduce-scatter wants L equal blocks
            keep = np.zeros(padded * es, np.uint8)
            mh.nat.copy(native.addr(keep), src, n * es)
            src, tmp_out = native.addr(keep), _tmp(mh, padded * es)
        shard = _tmp(mh, padded // L * es)
        mh.local.reduce_scatter(Buf(src, padded, dtype, None),
                                Buf(native.addr(shard), padded // L, dtype, None), op)
        del keep
        fut = mh.background(net_allreduce, mh, ring, native.addr(shard), padded // L, dtype, op,
                            1 + k * steps_per_piece, method)
        pending.append((fut, shard, lo, n, tmp_out))
        if len(pending) > 1:
            finish(pending.pop(0))
    for item in pending:
        finish(item)


def allreduce_leaders(mh, in_addr, out_addr, count, dtype, op):
    out = Buf(out_addr, count, dtype, None)
    mh.local.reduce(Buf(in_addr, count, dtype, None), out, op, 0)
    if mh.local_rank == 0:
        net_allreduce(mh, host_ring(mh, 0), out_addr, count, dtype, op, 1,
                      mh.net_method(count * dt.DTYPE_SIZES[dtype]))
    mh.local.broadcast(out, 0)


# ---- rooted and gathering collectives ----------------------------------------------------
def rep(mh, j, root):
    """The rank that talks for host j: the root on its own host, else the host's first."""
    return root if mh.host_of[root] == j else mh.hosts[j][0]


def broadcast(mh, addr, count, dtype, root):
    es = dt.DTYPE_SIZES[dtype]
    me = rep(mh, mh.host_index, root)
    if mh.rank == root:
        mh.exchange([(rep(mh, j, root), 0, addr, count * es, mh.tag(1))
                     for j in range(len(mh.hosts)) if j != mh.host_index], "broadcast")
    elif mh.rank == me:
        mh.exchange([(root, 1, addr, count * es, mh.tag(1))], "broadcast")
    mh.local.broadcast(Buf(addr, count, dtype, None), mh.hosts[mh.host_index].index(me))


def reduce(mh, in_addr, out_addr, count, dtype, op, root):
    es = dt.DTYPE_SIZES[dtype]
    h = mh.host_index
    me = rep(mh, h, root)
    part = _tmp(mh, count * es)
    mh.local.reduce(Buf(in_addr, count, dtype, None), Buf(native.addr(part), count, dtype, None),
                    op, mh.hosts[h].index(me))
    H = len(mh.hosts)
    if mh.rank == root:
        parts = {h: part}
        for j in range(H):
            if j != h:
                parts[j] = _tmp(mh, count * es)
        mh.exchange([(rep(mh, j, root), 1, native.addr(parts[j]), count * es, mh.tag(1))
                     for j in range(H) if j != h], "reduce")
        mh.nat.reduce(out_addr, tuple(native.addr(parts[j]) for j in range(H)), count, dtype, op)
    elif mh.rank == me:
        mh.exchange([(root, 0, native.addr(part), count * es, mh.tag(1))], "reduce")


def gather(mh, send_addr, recv_addr, nbytes, root):
    """recv (on root) = every rank's nbytes, rank-major."""
    h = mh.host_index
    me = rep(mh, h, root)
    mine = mh.hosts[h]
    host_buf = _tmp(mh, nbytes * len(mine))
    lroot = mine.index(me)
    mh.local.gather(lroot, Buf(send_addr, nbytes, dt.U8, None),
                    Buf(native.addr(host_buf), nbytes * len(mine), dt.U8, None) if mh.rank == me else None)
    if mh.rank == root:
        ops = []
        for j, hs in enumerate(mh.hosts):
            if j != h:
                ops += [(rep(mh, j, root), 1, recv_addr + q * nbytes, nbytes, mh.tag(1)) for q in hs]
        mh.exchange(ops, "gather")
        base = native.addr(host_buf)
        for idx, q in enumerate(mine):
            mh.nat.copy(recv_addr + q * nbytes, base + idx * nbytes, nbytes)
    elif mh.rank == me:
        base = native.addr(host_buf)
        mh.exchange([(root, 0, base + idx * nbytes, nbytes, mh.tag(1)) for idx in range(len(mine))],
                    "gather")


def scatter(mh, send_addr, recv_addr, nbytes, root):
    h = mh.host_index
    me = rep(mh, h, root)
    mine = mh.hosts[h]
    host_buf = _tmp(mh, nbytes * len(mine))
    base = native.addr(host_buf)
    if mh.rank == root:
        ops = []
        for j, hs in enumerate(mh.hosts):
            if j != h:
                ops += [(rep(mh, j, root), 0, send_addr + q * nbytes, nbytes, mh.tag(1)) for q in hs]
        mh.exchange(ops, "scatter")
        for idx, q in enumerate(mine):
            mh.nat.copy(base + idx * nbytes, send_addr + q * nbytes, nbytes)
    elif mh.rank == me:
        mh.exchange([(root, 1, base + idx * nbytes, nbytes, mh.tag(1)) for idx in range(len(mine))],
                    "scatter")
    mh.local.scatter(mine.index(me),
                     Buf(base, nbytes * len(mine), dt.U8, None) if mh.rank == me else None,
                     Buf(recv_addr, nbytes, dt.U8, None))


def allgather(mh, send_addr, recv_addr, nbytes):
    h = mh.host_index
    mine = mh.hosts[h]
    host_buf = _tmp(mh, nbytes * len(mine))
    base = native.addr(host_buf)
    mh.local.allgather(Buf(send_addr, nbytes, dt.U8, None),
                       Buf(base, nbytes * len(mine), dt.U8, None))
    if mh.local_rank == 0:
        ops = []
        for j, hs in enumerate(mh.hosts):
            if j == h:
                continue
            leader = hs[0]
            ops += [(leader, 0, base + idx * nbytes, nbytes, mh.tag(1)) for idx in range(len(mine))]
            ops += [(leader, 1, recv_addr + q * nbytes, nbytes, mh.tag(1)) for q in hs]
        mh.exchange(ops, "allgather")
        for idx, q in enumerate(mine):
            mh.nat.copy(recv_addr + q * nbytes, base + idx * nbytes, nbytes)
    mh.local.broadcast(Buf(recv_addr, nbytes * mh.size, dt.U8, None), 0)


# ---- all-to-all ----------------------------------------------------------------------------
def all_to_all_pairwise(mh, send_addr, recv_addr, send_bytes, recv_bytes):
    """send_bytes[q] / recv_bytes[p]: bytes for / from every rank of the group."""
    n = mh.size
    sdispl = np.concatenate(([0], np.cumsum(send_bytes)[:-1])).astype(np.int64).tolist()
    rdispl = np.concatenate(([0], np.cumsum(recv_bytes)[:-1])).astype(np.int64).tolist()
    mine = mh.hosts[mh.host_index]
    lsend = [send_bytes[q] for q in mine]
    lrecv = [recv_bytes[q] for q in mine]
    contiguous = mine == list(range(mine[0], mine[0] + len(mine)))
    keep = []
    if contiguous:
        ls, lr = send_addr + sdispl[mine[0]], recv_addr + rdispl[mine[0]]
    else:  # this host's blocks are spread over the buffers: pack them
        a, b = _tmp(mh, sum(lsend)), _tmp(mh, sum(lrecv))
        keep += [a, b]
        ls, lr = native.addr(a), native.addr(b)
        off = 0
        for q, nb in zip(mine, lsend):
            mh.nat.copy(ls + off, send_addr + sdispl[q], nb)
            off += nb
    ops = []
    for q in range(n):
        if mh.host_of[q] != mh.host_index:
            ops.append((q, 0, send_addr + sdispl[q], send_bytes[q], mh.tag(1)))
            ops.append((q, 1, recv_addr + rdispl[q], recv_bytes[q], mh.tag(1)))
    # the network transfers run on the network thread while this host's blocks move
    remote = mh.background(mh.exchange, ops, "all_to_all") if ops else None
    mh.local.all_to_all(Buf(ls, sum(lsend), dt.U8, None), Buf(lr, sum(lrecv), dt.U8, None),
                        [int(c) for c in lsend], [int(c) for c in lrecv], False)
    if remote is not None:
        remote.result()
    if not contiguous:
        off = 0
        for q, nb in zip(mine, lrecv):
            mh.nat.copy(recv_addr + rdispl[q], lr + off, nb)
            off += nb


def all_to_all_2d(mh, send_addr, recv_addr, send_bytes, recv_bytes):
    """Hierarchical (2D) all-to-all: one TCP message per host pair, between the hosts' first
    ranks ("leaders").
        1. one shm all-to-all inside the host: every rank sends its blocks for the host's
           ranks directly, and everything bound for other hosts to the leader;
        2. the leaders exchange one frame per host pair (source rank major, then
           destination rank) over TCP;
        3. one shm all-to-all inside the host: the leader hands every rank what came for it.
    Every rank's counts are known where needed: the host's ranks share their send and
    receive counts through one small shm all-gather.
    bytes on the link: the remote blocks once; latency: 3 shm steps + 1 TCP step with
    H-1 frames per leader (instead of n-L frames per rank): for small blocks."""
    n, h = mh.size, mh.host_index
    mine = mh.hosts[h]
    L, lr = len(mine), mh.local_rank
    counts = np.array(list(send_bytes) + list(recv_bytes), np.int64)
    table = np.empty(L * 2 * n, np.int64)
    mh.local.allgather(Buf(native.addr(counts), counts.size, dt.I64, counts),
                       Buf(native.addr(table), table.size, dt.I64, table))
    table = table.reshape(L, 2, n)          # [local rank, send/recv, peer]
    sdispl = np.concatenate(([0], np.cumsum(send_bytes)[:-1])).astype(np.int64)
    rdispl = np.concatenate(([0], np.cumsum(recv_bytes)[:-1])).astype(np.int64)
    remote = [q for q in range(n) if mh.host_of[q] != h]
    nat = mh.nat
    # step 1: to each host rank its own blocks; to the leader also every remote-bound block
    s1_counts = [int(send_bytes[q]) for q in mine]
    out_remote = int(sum(send_bytes[q] for q in remote))
    s1_counts[0] += out_remote
    s1 = _tmp(mh, sum(s1_counts))
    base, off = native.addr(s1), 0
    for idx, q in enumerate(mine):
        nat.copy(base + off, send_addr + int(sdispl[q]), int(send_bytes[q]))
        off += int(send_bytes[q])
        if idx == 0:
            for p in remote:
                nat.copy(base + off, send_addr + int(sdispl[p]), int(send_bytes[p]))
                off += int(send_bytes[p])
    # what each host rank sends me in step 1: its block for me (+ its remote blocks if I lead)
    r1_counts = []
    for src_l in range(L):
        c = int(table[src_l, 0, mh.rank])
        if lr == 0:
            c += int(sum(table[src_l, 0, q] for q in remote))
        r1_counts.append(c)
    r1 = _tmp(mh, sum(r1_counts))
    mh.local.all_to_all(Buf(base, sum(s1_counts), dt.U8, None),
                        Buf(native.addr(r1), sum(r1_counts), dt.U8, None), [int(c) for c in s1_counts],
                        [int(c) for c in r1_counts], False)
    # my blocks from the host's ranks, into place
    off = 0
    for src_l, q in enumerate(mine):
        nb = int(table[src_l, 0, mh.rank])
        nat.copy(recv_addr + int(rdispl[q]), native.addr(r1) + off, nb)
        off += r1_counts[src_l]
    # step 2 (leaders): one frame per other host, source rank major
    if lr == 0:
        starts, off = [], 0
        for src_l in range(L):
            starts.append(off + int(table[src_l, 0, mh.rank]))  # its remote blocks follow
            off += r1_counts[src_l]
        frames_out, frames_in, ops = {}, {}, []
        for j, hs in enumerate(mh.hosts):
            if j == h:
                continue
            # out: for src in my host, for dst in host j: table[src, send, dst] bytes
            size_out = int(sum(table[s, 0, d] for s in range(L) for d in hs))
            buf = _tmp(mh, size_out)
            o = 0
            for s in range(L):
                # src s's remote blocks in r1 are in rank order over `remote`
                cur = starts[s]
                for p in remote:
                    nb = int(table[s, 0, p])
                    if mh.host_of[p] == j:
                        nat.copy(native.addr(buf) + o, native.addr(r1) + cur, nb)
                        o += nb
                    cur += nb
            frames_out[j] = buf
            # in: for src in host j, for dst in my host: table[dst, recv, src] bytes
            size_in = int(sum(table[d, 1, s] for s in hs for d in range(L)))
            frames_in[j] = _tmp(mh, size_in)
            ops.append((hs[0], 0, native.addr(buf), size_out, mh.tag(1)))
            ops.append((hs[0], 1, native.addr(frames_in[j]), size_in, mh.tag(1)))
        mh.exchange(ops, "all_to_all")
        # step 3 payload: for each host rank d, its remote blocks in source rank order
        s3_counts = [int(sum(table[d, 1, p] for p in remote)) for d in range(L)]
        s3 = _tmp(mh, sum(s3_counts))
        dst_off = np.concatenate(([0], np.cumsum(s3_counts)[:-1])).astype(np.int64)
        # position of (src p, dst d) inside frame j: src-major over hosts[j], dst over mine
        pos = {}
        for j, hs in enumerate(mh.hosts):
            if j == h:
                continue
            o = 0
            for p in hs:
                for d in range(L):
                    pos[(p, d)] = (j, o)
                    o += int(table[d, 1, p])
        fill = [0] * L
        for p in remote:  # source rank order, as every rank unpacks
            for d in range(L):
                nb = int(table[d, 1, p])
                j, o = pos[(p, d)]
                nat.copy(native.addr(s3) + int(dst_off[d]) + fill[d], native.addr(frames_in[j]) + o, nb)
                fill[d] += nb
        s3_all = [0] * L
        s3_all[:] = s3_counts
    else:
        s3, s3_all = _tmp(mh, 0), [0] * L
    mine_remote = int(sum(recv_bytes[p] for p in remote))
    r3_counts = [mine_remote if src_l == 0 else 0 for src_l in range(L)]
    r3 = _tmp(mh, mine_remote)
    mh.local.all_to_all(Buf(native.addr(s3), sum(s3_all), dt.U8, None),
                        Buf(native.addr(r3), mine_remote, dt.U8, None), [int(c) for c in s3_all],
                        [int(c) for c in r3_counts], False)
    off = 0
    for p in remote:
        nb = int(recv_bytes[p])
        nat.copy(recv_addr + int(rdispl[p]), native.addr(r3) + off, nb)
        off += nb
