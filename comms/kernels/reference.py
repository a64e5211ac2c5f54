"""Pure-Python (numpy) data path: the same functions, signatures and results as the C
helpers in comms.kernels._native. Used when the extension is not built or TOPOCOMM_PURE_PYTHON=1.

Counters are aligned uint64 words read and written through ctypes; on x86-64 aligned
8-byte loads/stores are atomic and ordered (TSO), which is what the protocol needs.
Waiting polls with a short spin, then yields, then sleeps with a growing back-off, and
checks peers' abort flags and liveness while it waits.
"""
from __future__ import annotations

import ctypes
import os
import time

from comms.core import dtypes as dt
from comms.core.layout import tag as _tag
from comms.core.status import AllToAllAlgorithm as A2A, Status
from comms.kernels.reference_ops import copy, reduce, reduce2, scale  # noqa: F401  (re-exported)
from comms.kernels.reference_tcp import tcp_exchange  # noqa: F401  (re-exported)

# the codes by name, as comms.kernels._native exposes them (from native/src/tc_internal.h)
STATUS = {s.name: s.value for s in Status}
A2A_ALGORITHMS = {a.name: a.value for a in A2A}

_u64 = ctypes.c_uint64
_i64 = ctypes.c_int64


def post(addr: int, value: int, waiters_addr: int) -> None:
    # no futex here: fallback waiters poll, and native waiters sleep with a short timeout
    _u64.from_address(addr).value = value


def set_spin(spin_s: float, yield_s: float) -> None:
    """The fallback polls with its own short back-off; kept for the same signature."""


def pid_alive(pid: int) -> bool:
    if pid <= 0 or pid == os.getpid():
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    except OSError:
        return True


def wait_all(addrs, target, abort_addrs, pids, waiters_addrs, timeout_s):
    """Wait until every counter at addrs (0 = skip) is >= target.

    Returns (status, idx): Status.OK, or TIMEOUT / ABORTED / DEAD with the index of the peer.
    """
    start = time.monotonic()
    deadline = start + timeout_s
    spins = 0
    next_check = start + 0.05
    pending = [i for i, a in enumerate(addrs) if a]
    while True:
        pending = [i for i in pending if _u64.from_address(addrs[i]).value < target]
        if not pending:
            return Status.OK, -1
        spins += 1
        if spins < 64:
            continue
        now = time.monotonic()
        if now >= next_check:
            next_check = now + 0.05
            for i in pending:
                if abort_addrs[i] and _u64.from_address(abort_addrs[i]).value:
                    return Status.ABORTED, i
                if pids[i] and not pid_alive(pids[i]):
                    return Status.DEAD, i
            if now >= deadline:
                return Status.TIMEOUT, pending[0]
        if spins < 256:
            os.sched_yield()
        else:
            time.sleep(min(0.0002 * (spins // 256), 0.001))


def ring_reduce_g(g, ctrl, data_off, op_id, in_addr, out_addr, count, block_elems, dtype, op,
                  chunk_elems, num_slots, slot_stride, block_stride, pads, do_gather, avg_n):
    """Reduce-scatter (+ all-gather when do_gather) of `count` elements split in n blocks.

    Mirrors allreduce.c:tc_ring_reduce (same protocol and results); see algorithms/allreduce.py
    for the protocol. ctrl = (posted_off, reduced_off, done_off, abort_off, waiters_off).
    pads[q] = page offset rank q used for block p: (pads[q] + p*block_elems*es) % 4096.
    This twin runs the three stages in lockstep per chunk (same results, less overlap).
    """
    rank, n, seg_bases, *_, pids, timeout_s = g
    posted_off, reduced_off, done_off, abort_off, waiters_off = ctrl
    es = dt.DTYPE_SIZES[dtype]
    me = rank
    aborts = [seg_bases[q] + abort_off if q != me else 0 for q in range(n)]
    waiters = [seg_bases[q] + waiters_off for q in range(n)]

    def peers(off):
        return [seg_bases[q] + off if q != me else 0 for q in range(n)]

    posted_peers, reduced_peers, done_peers = peers(posted_off), peers(reduced_off), peers(done_off)

    def blen(p):
        return max(0, min(block_elems, count - p * block_elems))

    def pos(q, s, p, c):
        pad = (pads[q] + (p * block_elems + c * chunk_elems) * es) % 4096
        return seg_bases[q] + data_off + s * slot_stride + p * block_stride + pad

    def peer_parts(lo):
        """(peer, elements of its block in the chunk starting at lo), peers with something."""
        for p in range(n):
            m = min(chunk_elems, blen(p) - lo)
            if p != me and m > 0:
                yield p, m

    num_chunks = max(1, -(-block_elems // chunk_elems)) if count else 0
    my_out = out_addr + (me * block_elems * es if do_gather else 0)
    for c in range(num_chunks):
        s = c % num_slots
        lo = c * chunk_elems
        if c >= num_slots:
            st, idx = wait_all(done_peers, _tag(op_id, c - num_slots + 1), aborts, pids, waiters, timeout_s)
            if st:
                return st, idx
        for p, m in peer_parts(lo):
            copy(pos(me, s, p, c), in_addr + (p * block_elems + lo) * es, m * es)
        post(seg_bases[me] + posted_off, _tag(op_id, c + 1), waiters[me])
        st, idx = wait_all(posted_peers, _tag(op_id, c + 1), aborts, pids, waiters, timeout_s)
        if st:
            return st, idx
        m = min(chunk_elems, blen(me) - lo)
        if m > 0:
            srcs = [in_addr + (me * block_elems + lo) * es if q == me else pos(q, s, me, c)
                    for q in range(n)]
            dst = my_out + lo * es
            reduce(dst, srcs, m, dtype, op)
            if avg_n:
                scale(dst, dst, m, dtype, 1.0 / avg_n)
            if do_gather:
                copy(pos(me, s, me, c), dst, m * es)
        if do_gather:
            post(seg_bases[me] + reduced_off, _tag(op_id, c + 1), waiters[me])
            st, idx = wait_all(reduced_peers, _tag(op_id, c + 1), aborts, pids, waiters, timeout_s)
            if st:
                return st, idx
            for p, m in peer_parts(lo):
                copy(out_addr + (p * block_elems + lo) * es, pos(p, s, p, c), m * es)
        post(seg_bases[me] + done_off, _tag(op_id, c + 1), waiters[me])
    return Status.OK, -1


NUM_COLL, WAIT_BUCKETS, H_TIME = 10, 40, 6    # as tc_stats in native/src/tc_internal.h


class _Group(tuple):
    """group_new's constants (a tuple the calls unpack) and `stats`: who arrived last at
    each collective and the waits it caused, as tc_stats counts them in C."""


class _Stats:
    def __init__(self, n):
        self.last = [[0] * n for _ in range(NUM_COLL)]
        self.waits = [[0] * WAIT_BUCKETS for _ in range(n)]
        self.warn_ns, self.warned_at_ns, self.callback = 0, 0, None


def group_new(rank, n, seg_bases, pids, timeout_s, arrived_off, abort_off, waiters_off,
              header_off0, header_off1, small_off0, small_off1):
    """The constant arguments of every *_g call, bound once per group."""
    g = _Group((rank, n, tuple(seg_bases), arrived_off, abort_off, waiters_off,
                (header_off0, header_off1), (small_off0, small_off1), tuple(pids), timeout_s))
    g.stats = _Stats(n)
    return g


def group_stats(g):
    """(last, waits): the counts as bytes of uint64, [NUM_COLL][n] and [n][WAIT_BUCKETS]."""
    import numpy as np
    return (np.array(g.stats.last, np.uint64).tobytes(),
            np.array(g.stats.waits, np.uint64).tobytes())


def group_set_warn(g, warn_ns, callback):
    """callback(rank, wait_ns) when an arrival waited more than warn_ns (at most once a
    second); callback None: never."""
    g.stats.warn_ns = 0 if callback is None else int(warn_ns)
    g.stats.callback = callback


def _count_arrival(g, header_off, coll):
    """Mirror of allreduce.c count_arrival."""
    S, n, seg = g.stats, g[1], g[2]
    times = [_i64.from_address(seg[q] + header_off + 8 * H_TIME).value for q in range(n)]
    last = max(range(n), key=lambda q: (times[q], -q))
    wait_ns = max(0, times[last] - min(times))
    b, us = 0, wait_ns // 1000
    while us and b < WAIT_BUCKETS - 1:
        us >>= 1
        b += 1
    S.last[coll if 0 <= coll < NUM_COLL else 0][last] += 1
    S.waits[last][b] += 1
    if S.warn_ns and wait_ns > S.warn_ns and last != g[0]:
        now = time.monotonic_ns()
        if now - S.warned_at_ns > 1_000_000_000:
            S.warned_at_ns = now
            if S.callback is not None:
                try:
                    S.callback(last, wait_ns)
                except Exception:  # noqa: BLE001 - a report must never fail the collective
                    pass


def allreduce_small_g(g, op_id, coll, root, in_addr, out_addr, count, dtype, op, avg_n):
    """Latency path: the input travels as the arrival's meta into this parity's small slot,
    then every rank reduces all slots in rank order (so every rank gets the same bits).
    Mirrors allreduce.c:tc_allreduce_small. Status.MISMATCH means the headers disagree."""
    n, seg, small_off = g[1], g[2], g[7][op_id & 1]
    nbytes = count * dt.DTYPE_SIZES[dtype]
    st, idx = _arrive(g, op_id, (coll, count, dtype, op, root, 0, 0), 0x3e, small_off,
                      lambda dst: copy(dst, in_addr, nbytes))
    if st:
        return st, idx
    reduce(out_addr, [seg[q] + small_off for q in range(n)], count, dtype, op)
    if avg_n:
        scale(out_addr, out_addr, count, dtype, 1.0 / avg_n)
    return Status.OK, -1


def ring_once_g(g, op_id, coll, in_addr, out_addr, count, dtype, op, avg_n, ctrl, data_off,
                block_elems, chunk_elems, num_slots, slot_stride, block_stride, do_gather):
    """The ring in one call: the arrival (extra word: my input's page offset) and
    ring_reduce_g (do_gather: all-reduce, else reduce-scatter). Mirrors
    allreduce.c:tc_ring_once."""
    n, seg, hdr = g[1], g[2], g[6]
    st, idx = _arrive(g, op_id, (coll, count, dtype, op, -1, 0, in_addr % 4096), 0x3e, 0, None)
    if st:
        return st, idx
    pads = [_i64.from_address(seg[q] + hdr[op_id & 1] + 8 * 8).value & 4095 for q in range(n)]
    return ring_reduce_g(g, ctrl, data_off, op_id, in_addr, out_addr, count, block_elems, dtype,
                         op, chunk_elems, num_slots, slot_stride, block_stride, pads,
                         1 if do_gather else 0, avg_n)


def addr_of(buf):
    import numpy as np
    return np.frombuffer(buf, dtype=np.uint8).ctypes.data if not isinstance(buf, np.ndarray) \
        else buf.ctypes.data


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_libc = None


def cma_read_many(pids, local_addrs, remote_addrs, sizes):
    """process_vm_readv through ctypes, 1 MiB per call; 0 or the first errno."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    for pid, loc, rem, size in zip(pids, local_addrs, remote_addrs, sizes):
        done = 0
        while done < size:
            m = min(size - done, 1 << 20)
            liov, riov = _IoVec(loc + done, m), _IoVec(rem + done, m)
            got = _libc.process_vm_readv(int(pid), ctypes.byref(liov), 1, ctypes.byref(riov), 1, 0)
            if got < 0:
                err = ctypes.get_errno()
                if err == 4:  # EINTR
                    continue
                return err or 5
            if got == 0:
                return 14
            done += got
    return 0


def arrive_g(g, op_id, coll, count, dtype, op, root, error, extra, cmp_mask, meta_off, meta):
    """Mirror of allreduce.c:tc_arrive: publish the header (and meta), wait for all, compare."""
    def write_meta(dst):
        for i, v in enumerate(meta):
            _i64.from_address(dst + 8 * i).value = int(v)
    return _arrive(g, op_id, (coll, count, dtype, op, root, error, extra), cmp_mask, meta_off,
                   write_meta if meta is not None else None)


def _arrive(g, op_id, words, cmp_mask, meta_off, write_meta):
    rank, n, seg, arrived_off, abort_off, waiters_off, hdr, _small, pids, timeout_s = g
    header_off = hdr[op_id & 1]
    aborts = [seg[q] + abort_off if q != rank else 0 for q in range(n)]
    waiters = [seg[q] + waiters_off for q in range(n)]
    arrived = [seg[q] + arrived_off if q != rank else 0 for q in range(n)]
    if op_id > 1:
        st, idx = wait_all(arrived, op_id - 1, aborts, pids, waiters, timeout_s)
        if st:
            return st, idx
    h = seg[rank] + header_off
    coll, count, dtype, op, root, error, extra = words
    for i, v in enumerate((op_id, coll, count, dtype, op, root, time.monotonic_ns(), error,
                           extra)):
        _i64.from_address(h + 8 * i).value = v
    if write_meta is not None:
        write_meta(seg[rank] + meta_off)
    post(seg[rank] + arrived_off, op_id, waiters[rank])
    st, idx = wait_all(arrived, op_id, aborts, pids, waiters, timeout_s)
    if st:
        return st, idx
    for q, a in enumerate(aborts):    # a peer that arrived, then gave up waiting for us
        if a and _u64.from_address(a).value:
            return Status.ABORTED, q
    ref = [_i64.from_address(seg[0] + header_off + 8 * i).value for i in range(8)]
    for q in range(n):
        hq = [_i64.from_address(seg[q] + header_off + 8 * i).value for i in range(8)]
        if hq[7] or any((cmp_mask >> f) & 1 and hq[f] != ref[f] for f in range(1, 6)):
            return Status.MISMATCH, q
    _count_arrival(g, header_off, coll)
    return Status.OK, -1


def pair_partner(me, r, n):
    """alltoall.c:pair_partner: round r's partner in the round-robin tournament (n even)."""
    m = n - 1
    if me == m:
        return r * ((m + 1) // 2) % m
    p = (r - me) % m
    return m if p == me else p


def alltoall_pairwise(g, ctrl, data_off, op_id, send, recv, sdispl, sbytes, rdispl, rbytes,
                      chunk, num_slots, flags=0):
    """Mirror of alltoall.c:tc_alltoall_pairwise (chunk by chunk, in lockstep per round, so
    each chunk goes into my slots before the chunk received from the same place lands);
    flags: 1 stream_in (non-temporal slot writes in C: the same bytes here), 2 paired rounds
    (n even)."""
    rank, n, seg, _arr, _abort, _w, _hdr, _small, pids, timeout_s = g
    paired = bool(int(flags) & 2)
    if paired and n % 2:
        return Status.MISMATCH, -1
    posted_off, done_off, abort_off, waiters_off = ctrl
    me = rank
    aborts = [seg[q] + abort_off if q != me else 0 for q in range(n)]
    waiters = [seg[q] + waiters_off for q in range(n)]

    def tag(r, j):
        return (op_id << 32) | (r << 22) | j

    def only(q, off):
        return [seg[p] + off if p == q else 0 for p in range(n)]

    area = seg[me] + data_off
    if sbytes[me] and recv + rdispl[me] != send + sdispl[me]:
        copy(recv + rdispl[me], send + sdispl[me], sbytes[me])
    for r in range(1, n):
        dst = pair_partner(me, r - 1, n) if paired else (me + r) % n
        src = dst if paired else (me - r) % n
        if r > 1:
            prev = pair_partner(me, r - 2, n) if paired else (me + r - 1) % n
            last = -(-sbytes[prev] // chunk)
            if last:
                st, idx = wait_all(only(prev, done_off), tag(r - 1, last), aborts, pids, waiters, timeout_s)
                if st:
                    return st, idx
        ns, nr = -(-sbytes[dst] // chunk), -(-rbytes[src] // chunk)
        src_area = seg[src] + data_off
        for j in range(max(ns, nr)):
            if j < ns:
                if j >= num_slots:
                    st, idx = wait_all(only(dst, done_off), tag(r, j - num_slots + 1), aborts, pids,
                                       waiters, timeout_s)
                    if st:
                        return st, idx
                lo = j * chunk
                copy(area + (j % num_slots) * chunk, send + sdispl[dst] + lo, min(chunk, sbytes[dst] - lo))
                post(seg[me] + posted_off, tag(r, j + 1), waiters[me])
            if j < nr:
                st, idx = wait_all(only(src, posted_off), tag(r, j + 1), aborts, pids, waiters, timeout_s)
                if st:
                    return st, idx
                lo = j * chunk
                copy(recv + rdispl[src] + lo, src_area + (j % num_slots) * chunk, min(chunk, rbytes[src] - lo))
                post(seg[me] + done_off, tag(r, j + 1), waiters[me])
    return Status.OK, -1


# MoE row kernels (native/src/moe.c); their numpy twins live with the MoE code
from comms.kernels.reference_moe import moe_gather_rows, moe_reduce_rows, moe_row_dot  # noqa: E402,F401


def alltoall_even_g(g, op_id, coll, send, recv, count, dtype, cmp_mask, ctrl, data_off, chunk,
                    num_slots, algo, direct_mode):
    """Mirror of module.c:alltoall_even_g: arrive (split mode 1, root word = proposed
    algorithm), then the algorithm A2A.agreed gives: PAIRWISE or PAIRED rounds, DIRECT
    reads (direct_mode 1: process_vm_readv, 2: memcpy), PAIRWISE_STREAMED rounds with
    streamed slot writes (AllToAllAlgorithm); Status.OTHER_ALGORITHM with its number for
    another one (no data moved)."""
    st, idx = arrive_g(g, op_id, coll, count, dtype, 1, algo, 0, send, cmp_mask, 0, None)
    if st:
        return st, idx
    n, seg, hdr = g[1], g[2], g[6]
    algo = A2A.agreed([_i64.from_address(seg[q] + hdr[op_id & 1] + 8 * 5).value
                       for q in range(n)])
    block = count // n * dt.DTYPE_SIZES[dtype]
    if algo == A2A.DIRECT and direct_mode in (1, 2):
        st, idx = alltoall_direct(g, ctrl, op_id, send, recv, block, direct_mode == 1)
    elif algo in (A2A.PAIRWISE, A2A.PAIRWISE_STREAMED, A2A.PAIRED):
        displ = [q * block for q in range(n)]
        sizes = [block] * n
        st, idx = alltoall_pairwise(g, ctrl, data_off, op_id, send, recv, displ, sizes, displ,
                                    sizes, chunk, num_slots, 2 if algo == A2A.PAIRED else 0)
    else:
        return Status.OTHER_ALGORITHM, algo
    return (st, idx) if st else (Status.OK, algo)


def alltoall_direct(g, ctrl, op_id, send, recv, block, via_cma):
    """Mirror of alltoall.c:tc_alltoall_direct."""
    me, n, seg, _arr, _abort, _w, hdr, _small, pids, timeout_s = g
    _posted, done_off, abort_off, waiters_off = ctrl
    if block == 0 or n == 1:
        copy(recv + me * block, send + me * block, block)
        return Status.OK, -1
    for r in range(1, n):
        q = (me + r) % n
        theirs = _i64.from_address(seg[q] + hdr[op_id & 1] + 8 * 8).value + me * block
        if not via_cma:
            copy(recv + q * block, theirs, block)
        else:
            err = cma_read_many([pids[q]], [recv + q * block], [theirs], [block])
            if err:
                return Status.read_failed(err), q
    waiters = [seg[q] + waiters_off for q in range(n)]
    post(seg[me] + done_off, _tag(op_id, 1), waiters[me])
    copy(recv + me * block, send + me * block, block)
    return wait_all([seg[q] + done_off if q != me else 0 for q in range(n)], _tag(op_id, 1),
                    [seg[q] + abort_off if q != me else 0 for q in range(n)], pids, waiters,
                    timeout_s)
