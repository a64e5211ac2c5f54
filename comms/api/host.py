"""HostGroup: the ranks of one host, sharing memory; every collective of a one-host
Communicator, and the host steps of a multi-host one (comms/api/multihost.py).

Its collectives take arguments the Communicator already checked (Bufs, op codes, split
counts) and follow one shape:
  1. begin: the group is open and usable; the op counter moves on,
  2. arrive: publish what this rank asks for and check all ranks agree (comms/core/context.py);
     a rank whose arguments were rejected arrives flagged (reject()), so every rank raises
     ArgumentMismatch before data moves and the group stays usable,
  3. move data with the algorithm the selector chose (comms/algorithms/host/).
An error in step 3 (dead, aborted or silent peer) breaks the group: later calls raise.
"""
from __future__ import annotations

import ctypes
import functools
from time import perf_counter

import numpy as np

from comms.algorithms.host import allreduce as ar
from comms.algorithms.host import direct, pairwise, staged
from comms.algorithms.host.p2p import P2P
from comms.api.staging import Staging
from comms.core import dtypes as dt
from comms.core import layout as L
from comms.core.context import COLL_CODES, COLL_NAMES, Context
from comms.core.errors import ArgumentMismatch, CommError
from comms.core.log import TRACE, log, tracing
from comms.core.status import AllToAllAlgorithm as A2A
from comms.core.status import Status
from comms.kernels import native
from comms.plan import calibrate
from comms.plan.select import Measured, Selector
from topology import env

# the modules behind the copy-only collectives' algorithm names (comms/plan/select.py)
_COPY_ALGORITHMS = {"direct": direct, "pairwise": pairwise, "staged": staged}

_A2A_CODE = COLL_CODES["all_to_all"]
# an even all-to-all's root word carries the algorithm the rank proposes; rank 0's is run
_A2A_FIELDS = (L.H_COLL, L.H_COUNT, L.H_DTYPE, L.H_OP)
_A2A_MASK = sum(1 << f for f in _A2A_FIELDS)
# The even all-to-all's algorithms by the number a rank proposes in its arrival header
# (comms/core/status.py AllToAllAlgorithm; the C call alltoall_even_g runs the same numbers).
# PAIRWISE_STREAMED: pairwise with streamed (non-temporal) slot writes, measured against
# plain pairwise where a group has no direct reads (comms/algorithms/host/pairwise.py).
_A2A_RUNS = {A2A.PAIRWISE: pairwise.all_to_all, A2A.DIRECT: direct.all_to_all,
             A2A.STAGED: staged.all_to_all,
             A2A.PAIRWISE_STREAMED: functools.partial(pairwise.all_to_all, stream_in=True),
             A2A.PAIRED: functools.partial(pairwise.all_to_all, paired=True)}

_torch_tensor_type = None  # torch.Tensor once one was seen (torch is never imported here)


def _is_torch_tensor_type(t):
    """Whether t is torch.Tensor (remembered for the fast paths' type checks)."""
    global _torch_tensor_type
    if t is _torch_tensor_type:
        return True
    if t.__module__.startswith("torch") and t.__name__ == "Tensor":
        _torch_tensor_type = t
        return True
    return False


def _bucket_quantile(counts, q) -> float:
    """The upper edge (us) of the power-of-two bucket holding quantile q of `counts`
    (bucket b: waits below 2**b us); 0 when nothing was counted."""
    total = int(counts.sum())
    if not total:
        return 0.0
    seen = 0
    for b, c in enumerate(counts):
        seen += int(c)
        if seen >= q * total:
            return float(1 << b) if b else 1.0
    return float(1 << (len(counts) - 1))


def _straggler_warning(names, where, warn_ms):
    """The callback the arrival calls (at most once a second) when a rank kept the others
    waiting more than TOPOCOMM_STRAGGLER_WARN ms: one log line naming it. It holds no
    reference to the group (the group's C handle holds the callback)."""
    names = list(names) if names is not None else None
    at = f" ({where})" if where else ""

    def warn(q, wait_ns):
        who = names[q] if names is not None and 0 <= q < len(names) else q
        log.warning("topocomm: rank %s%s kept the others waiting %.1f ms at an arrival "
                    "(TOPOCOMM_STRAGGLER_WARN=%g ms; at most one such line a second)",
                    who, at, wait_ns / 1e6, warn_ms)
    return warn


def _run_a2a_kind(kind, ctx, saddr, raddr, sizes, all_sizes):
    """Run the even all-to-all algorithm number `kind` (AllToAllAlgorithm)."""
    _A2A_RUNS[A2A(kind)](ctx, saddr, raddr, sizes, sizes, all_sizes)


class HostGroup:
    """`size` ranks of one host; this object is rank `rank`.

    store, prefix: the rendezvous and this group's key namespace on it.
    transport: "shm" (processes, POSIX shared memory) or "threads" (tests).
    names: the group ranks of these ranks, when the host group is part of a larger one
        (errors then name the ranks users know).
    """

    def __init__(self, rank: int, size: int, store, prefix: str, *, timeout: float,
                 transport: str = "shm", layout: L.SegmentLayout | None = None, names=None,
                 where: str = ""):
        self.rank, self.size, self.timeout = rank, size, timeout
        self.nat = native.impl()
        self.layout = layout or L.SegmentLayout(size)
        if transport == "threads":
            from comms.transport.threads import ThreadsTransport
            tr = ThreadsTransport(rank, size, store, prefix, self.layout)
        elif transport == "shm":
            from comms.transport.shm import ShmTransport
            tr = ShmTransport(rank, size, store, prefix, self.layout)
        else:
            raise ValueError(f"transport: unknown {transport!r}; use 'shm' or 'threads'")
        self.transport = tr
        try:
            # how peers' buffers are read: 1 process_vm_readv, 2 memcpy (threads), 0 not at all
            self.direct_mode = {"cma": 1, "memcpy": 2}.get(getattr(tr, "direct", None), 0)
            self.ctx = Context(rank, size, tr, self.layout, self.nat, self.timeout)
            self.ctx.names = list(names) if names is not None else None
            self.use_links()
            self.p2p = P2P(self.ctx)
            self.staging = Staging(self.nat, size)
            self.closed = False
            # every rank's all-to-all counts as published at arrival, per parity (views)
            self._meta_rows = [[(ctypes.c_int64 * (2 * size)).from_address(
                b + self.layout.meta_at(par)) for b in self.ctx.seg] for par in (0, 1)]
            # latency path of allreduce: (type, dtype, op) -> (dtype code, op code)
            self._fast = {}
            # the same for reduce-scatter (its sizes are in _fast_ring)
            self._fast_rs = {}
            # even-split all-to-all: (type, dtype, nbytes) -> plan, once checked
            self._fast_a2a = {}
            self.where = where
            warn_ms = env.get("TOPOCOMM_STRAGGLER_WARN")
            if warn_ms is not None:
                self.nat.group_set_warn(self.ctx.group, int(warn_ms * 1e6),
                                        _straggler_warning(self.ctx.names, where, warn_ms))
        except BaseException:
            tr.close()
            raise

    def use_links(self, link=None):
        """Build the choices (from the measured `link` when given: TOPOCOMM_PROBE) and the
        size limit of the small-allreduce fast path that follows from them."""
        self.selector = Selector(self.size, self.layout.small_bytes,
                                 getattr(self.transport, "direct", None),
                                 data_bytes=self.layout.data_bytes, link=link,
                                 calibration=calibrate.current())
        forced = self.selector.forced.get("allreduce")
        self._fast_limit = 0 if forced and forced != "small" else self.selector.small_limit
        # above it, and reduce-scatter: (collective, count, dtype code) -> ring plan, for
        # sizes the ring ran before
        self._fast_ring = {}

    # ---- plumbing ---------------------------------------------------------------------
    @property
    def broken(self):
        return self.ctx.broken

    @property
    def abort_flags(self) -> tuple:
        """Addresses of the peers' abort flags (0-free): a network wait watches them too."""
        return tuple(a for a in self.ctx.aborts if a)

    def explain(self, collective: str, nbytes: int, dtype: str = "float32") -> str:
        return self.selector.explain(collective, int(nbytes), dtype)

    def stats(self) -> dict:
        """Who arrived last at this group's collectives, and the waits it caused (counted
        by every arrival in C or its numpy twin: native/src/allreduce.c count_arrival).

        {"arrivals": n, "ranks": {rank: {"last": count, "last_share": fraction,
        "wait_p50_us", "wait_p99_us": the wait of the others when it came last (upper
        edges of power-of-two buckets)}}, "by_collective": {name: {rank: times last}}};
        ranks are the group's (a host group inside a multi-host one names its ranks as the
        whole group knows them), "where" says which part of the group this is."""
        raw_last, raw_waits = self.nat.group_stats(self.ctx.group)
        n = self.size
        last = np.frombuffer(raw_last, np.uint64).reshape(-1, n)
        waits = np.frombuffer(raw_waits, np.uint64).reshape(n, -1)
        names = self.ctx.names or list(range(n))
        total = int(last.sum())
        ranks = {}
        for q in range(n):
            count = int(last[:, q].sum())
            ranks[names[q]] = {"last": count, "last_share": count / total if total else 0.0,
                               "wait_p50_us": _bucket_quantile(waits[q], 0.50),
                               "wait_p99_us": _bucket_quantile(waits[q], 0.99)}
        by_coll = {}
        for code, name in COLL_NAMES.items():
            row = last[int(code)] if int(code) < last.shape[0] else None
            if row is not None and row.any():
                by_coll[name] = {names[q]: int(row[q]) for q in range(n) if row[q]}
        return {"arrivals": total, "where": self.where or f"{n} rank(s) of one host",
                "ranks": ranks, "by_collective": by_coll}

    def estimate_us(self, collective, nbytes):
        return self.selector.estimate_us(collective, nbytes)

    def begin(self, coll):
        if self.closed:
            raise CommError("communicator is closed")
        self.ctx.check_usable()
        self.ctx.next_op()
        if tracing():
            self._t0 = perf_counter()
            log.log(TRACE, "%s rank %s: op %d %s arrives", self.where or "group",
                    self.ctx.who(self.rank), self.ctx.op_id, coll)
        return self.ctx

    def reject(self, coll):
        """This rank's arguments for `coll` were refused: take part in that collective
        flagged, so every rank raises ArgumentMismatch before data moves."""
        self.begin(coll)
        try:
            self.ctx.arrive(COLL_CODES[coll], error=1)
        except (CommError, ArgumentMismatch):
            pass

    def arrive(self, coll, count=0, dtype=0, op=0, root=-1, error=0, meta=None):
        """begin + arrival only (the multi-host agreement's host step)."""
        self.begin(coll)
        self.ctx.arrive(COLL_CODES[coll], count, dtype, op, root, error=error, meta=meta)

    def published_counts(self) -> list:
        """Every host rank's [sends to, expects from] each host rank, as published with
        meta at the current op's arrival."""
        return [row[:] for row in self._meta_rows[self.ctx.op_id % 2]]

    def abort(self, reason):
        self.ctx.abort(reason)

    def _run(self, fn, *args):
        try:
            out = fn(*args)
            if tracing():
                log.log(TRACE, "%s rank %s: op %d done in %.1f us", self.where or "group",
                        self.ctx.who(self.rank), self.ctx.op_id,
                        (perf_counter() - getattr(self, "_t0", perf_counter())) * 1e6)
            return out
        except (CommError, ArgumentMismatch):
            raise
        except BaseException as exc:  # interrupted mid-data-move: peers must not wait on us
            self.ctx.abort(f"{type(exc).__name__}: {exc}")
            raise

    # ---- collectives ------------------------------------------------------------------
    def allreduce_fast(self, buf, op, out):
        """A numpy array or CPU tensor whose (type, dtype, op) passed the checks before:
        arrival, checks and the reduction in one C call, by the latency path where it fits
        the small slot, else by the ring where this size ran before. None, with nothing
        done, where it does not apply."""
        if type(op) is not str or self.closed or self.ctx.broken:
            return None
        tb = type(buf)
        if tb is np.ndarray and out is None:
            hit = self._fast.get((tb, buf.dtype, op))
            if hit is not None and buf.flags.c_contiguous and buf.flags.writeable:
                addr = self.nat.addr_of(buf)
                if buf.nbytes <= self._fast_limit:
                    return self._allreduce_fast(buf, addr, addr, buf.size, hit)
                return self._allreduce_ring_fast(buf, addr, addr, buf.size, hit)
        elif tb is np.ndarray and type(out) is np.ndarray:
            hit = self._fast.get((tb, buf.dtype, op))
            if (hit is not None and out.dtype == buf.dtype and out.size == buf.size and
                    buf.flags.c_contiguous and out.flags.c_contiguous and out.flags.writeable):
                addr, out_addr, nbytes = self.nat.addr_of(buf), self.nat.addr_of(out), buf.nbytes
                if nbytes <= self._fast_limit:
                    self._allreduce_fast(buf, addr, out_addr, buf.size, hit)
                    return out
                # the ring writes out ahead of inputs it has not read: exactly in place or apart
                if (addr == out_addr or addr >= out_addr + nbytes or out_addr >= addr + nbytes) \
                        and self._allreduce_ring_fast(buf, addr, out_addr, buf.size, hit) \
                        is not None:
                    return out
        elif tb is _torch_tensor_type and out is None:
            hit = self._fast.get((tb, buf.dtype, op))
            if hit is not None and buf.is_contiguous() and not buf.is_cuda:
                count = buf.numel()
                addr = buf.data_ptr()
                if count * dt.DTYPE_SIZES[hit[0]] <= self._fast_limit:
                    return self._allreduce_fast(buf, addr, addr, count, hit)
                return self._allreduce_ring_fast(buf, addr, addr, count, hit)
        return None

    def _allreduce_ring_fast(self, buf, addr, out_addr, count, hit):
        plan = self._fast_ring.get(("allreduce", count, hit[0]))
        return None if plan is None else self._ring_once(buf, addr, out_addr, count, hit, plan)

    def _ring_once(self, result, addr, out_addr, count, hit, plan):
        """The ring of a (collective, size) run before, in one C call (ar.ring_once)."""
        code, opc = hit
        ctx = self.ctx
        ctx.op_id += 1
        avg = opc == dt.AVG
        try:
            st, idx = ar.ring_once(ctx, addr, out_addr, count, code, dt.SUM if avg else opc,
                                   self.size if avg else 0, plan)
        except BaseException as exc:
            ctx.abort(f"{type(exc).__name__}: {exc}")
            raise
        if st:
            if st == Status.MISMATCH:
                ctx.check_headers(plan[0])
            ctx.fail(st, idx, COLL_NAMES[plan[0]])
        return result

    def reduce_scatter_fast(self, send, recv, op):
        """A reduce-scatter of numpy arrays or CPU tensors whose (type, dtype, op) and size
        ran before, recv apart from send or its own block of it: arrival and ring in one C
        call. None, with nothing done, where it does not apply."""
        if type(op) is not str or self.closed or self.ctx.broken:
            return None
        ts = type(send)
        if ts is not type(recv) or not (ts is np.ndarray or ts is _torch_tensor_type):
            return None
        hit = self._fast_rs.get((ts, send.dtype, op))
        if hit is None or recv.dtype != send.dtype:
            return None
        if ts is np.ndarray:
            if not (send.flags.c_contiguous and recv.flags.c_contiguous and
                    recv.flags.writeable):
                return None
            count, rcount = send.size, recv.size
            saddr, raddr = self.nat.addr_of(send), self.nat.addr_of(recv)
        else:                                   # a torch tensor
            if not (send.is_contiguous() and recv.is_contiguous()) or send.is_cuda or \
                    recv.is_cuda:
                return None
            count, rcount = send.numel(), recv.numel()
            saddr, raddr = send.data_ptr(), recv.data_ptr()
        plan = self._fast_ring.get(("reduce_scatter", count, hit[0]))
        if plan is None or rcount * self.size != count:
            return None
        es = dt.DTYPE_SIZES[hit[0]]
        if not (raddr == saddr + self.rank * rcount * es or raddr >= saddr + count * es or
                saddr >= raddr + rcount * es):
            return None
        return self._ring_once(recv, saddr, raddr, count, hit, plan)

    def _allreduce_fast(self, buf, addr, out_addr, count, hit):
        ctx = self.ctx
        ctx.op_id += 1
        code, opc = hit
        avg = opc == dt.AVG
        try:
            st, idx = self.nat.allreduce_small_g(ctx.group, ctx.op_id, 1, -1, addr, out_addr,
                                                 count, code, dt.SUM if avg else opc,
                                                 self.size if avg else 0)
        except BaseException as exc:
            ctx.abort(f"{type(exc).__name__}: {exc}")
            raise
        if st:
            if st == Status.MISMATCH:
                ctx.check_headers(COLL_CODES["allreduce"])
            ctx.fail(st, idx, "allreduce")
        return buf

    def allreduce(self, sb, rb, opc, op=None):
        """rb = the reduction of every rank's sb (rb may be sb: in place). `op`: the name
        the caller used, to remember the (type, dtype, op) for the latency path."""
        self.begin("allreduce")
        # out overlapping buf other than exactly (in place): the ring writes out ahead of
        # inputs it has not read yet, so it reads a copy
        in_addr, opr, keep = self.staging.reduce_source(sb, rb, opc, 0)
        self._run(self._allreduce, in_addr, rb.addr, sb.count, sb.dtype, opr, "allreduce", -1)
        # float16 AVG is never cached: the one-call path would sum before dividing
        if type(op) is str and (rb is sb or type(rb.obj) is type(sb.obj)) and \
                not (opc == dt.AVG and sb.dtype == dt.F16):
            tb = type(sb.obj)
            if tb is np.ndarray or _is_torch_tensor_type(tb):
                self._fast[(tb, sb.obj.dtype, op)] = (sb.dtype, opc)
        return rb.obj

    def _allreduce(self, in_addr, out_addr, count, dtype, opc, coll, root):
        avg_n = self.size if opc == dt.AVG else 0
        cop = dt.SUM if opc == dt.AVG else opc
        nbytes = count * dt.DTYPE_SIZES[dtype]
        choice = self.selector.choose(coll, nbytes)
        if choice.algorithm == "small":
            ar.small_allreduce(self.ctx, in_addr, out_addr, count, dtype, cop, avg_n, coll, root)
        else:  # every rank has the same size (checked at arrival), so the same chunk
            chunk = choice.chunk_bytes or ar.DEFAULT_CHUNK_BYTES
            ar.ring_reduce(self.ctx, in_addr, out_addr, count, dtype, cop, avg_n, True, coll,
                           root, chunk_bytes=chunk)
            if coll == "allreduce":     # later calls of this size: one C call
                self._fast_ring[(coll, count, dtype)] = ar.ring_plan(self.ctx, coll, count,
                                                                     dtype, None, chunk)

    def reduce(self, sb, rb, opc, root):
        """The reduction of every rank's sb into rb on `root`; rb is unchanged elsewhere."""
        self.begin("reduce")
        in_addr, opr, aside = self.staging.reduce_source(
            sb, rb if self.rank == root else None, opc, 0)
        if self.rank == root:
            out_addr, keep = rb.addr, None
        else:
            keep = self.staging.scratch("reduce", sb.nbytes)
            out_addr = keep.ctypes.data
        self._run(self._allreduce, in_addr, out_addr, sb.count, sb.dtype, opr, "reduce", root)
        return rb.obj

    def reduce_scatter(self, sb, rb, opc, op=None):
        """rb (on rank r) = the reduction of block r of every rank's sb. `op`: the name the
        caller used, to remember the (type, dtype, op) and size for the one-call path."""
        ctx = self.begin("reduce_scatter")
        # in place: recv is block `rank` of send
        saddr, opr, keep = self.staging.reduce_source(sb, rb, opc, -self.rank * rb.nbytes)
        avg_n = self.size if opr == dt.AVG else 0
        cop = dt.SUM if opr == dt.AVG else opr
        chunk = self.selector.choose("reduce_scatter", sb.nbytes).chunk_bytes or \
            ar.DEFAULT_CHUNK_BYTES
        self._run(ar.ring_reduce, ctx, saddr, rb.addr, sb.count, sb.dtype, cop, avg_n, False,
                  "reduce_scatter", -1, rb.count, chunk)
        # read straight from send (no copy aside, no float16 pre-scaling): later calls of
        # this size take one C call
        tb = type(sb.obj)
        if type(op) is str and keep is None and type(rb.obj) is tb and \
                (tb is np.ndarray or _is_torch_tensor_type(tb)):
            self._fast_rs[(tb, sb.obj.dtype, op)] = (sb.dtype, opc)
            self._fast_ring[("reduce_scatter", sb.count, sb.dtype)] = ar.ring_plan(
                ctx, "reduce_scatter", sb.count, sb.dtype, rb.count, chunk)
        return rb.obj

    def broadcast(self, b, root):
        ctx = self.begin("broadcast")
        algo = self._algo("broadcast", b.nbytes)

        def go():
            ctx.arrive(COLL_CODES["broadcast"], b.count, b.dtype, 0, root, extra=b.addr)
            algo.broadcast(ctx, b.addr, b.nbytes, root)
        self._run(go)
        return b.obj

    def allgather(self, sb, rb):
        """rb = every rank's sb, rank-major."""
        ctx = self.begin("allgather")
        algo = self._algo("allgather", rb.nbytes)
        # peers read my send while I write recv: direct reads need it apart from recv even
        # in place; the staged copies handle in place (send = my block of recv) only
        saddr, keep = self.staging.unaliased(sb, rb) if algo is direct else \
            self.staging.unaliased(sb, rb, self.rank * sb.nbytes)

        def go():
            ctx.arrive(COLL_CODES["allgather"], sb.count, sb.dtype, extra=saddr)
            algo.allgather(ctx, saddr, rb.addr, sb.nbytes)
        self._run(go)
        return rb.obj

    def gather(self, root, sb, rb):
        """rb (root only; None elsewhere) = every rank's sb, rank-major."""
        ctx = self.begin("gather")
        raddr = rb.addr if rb is not None else 0
        saddr, keep = sb.addr, None
        if rb is not None:      # the root: in place when send is its own block of recv
            saddr, keep = self.staging.unaliased(sb, rb, root * sb.nbytes)
        algo = self._algo("gather", sb.nbytes * self.size)

        def go():
            ctx.arrive(COLL_CODES["gather"], sb.count, sb.dtype, 0, root, extra=saddr)
            algo.allgather(ctx, saddr, raddr, sb.nbytes, root=root)
        self._run(go)
        return rb.obj if rb is not None else None

    def scatter(self, root, sb, rb):
        """rb = block `rank` of the root's sb (sb None off the root)."""
        ctx = self.begin("scatter")
        saddr, keep = sb.addr if sb is not None else 0, None
        if sb is not None:      # the root: in place when recv is its own block of send
            saddr, keep = self.staging.unaliased(sb, rb, -root * rb.nbytes)
        algo = self._algo("scatter", rb.nbytes * self.size)

        def go():
            ctx.arrive(COLL_CODES["scatter"], rb.count, rb.dtype, 0, root, extra=saddr)
            algo.scatter(ctx, saddr, rb.addr, rb.nbytes, root)
        self._run(go)
        return rb.obj

    def all_to_all_fast(self, send, recv):
        """An even all-to-all of a (type, dtype, size) checked before, numpy arrays or CPU
        tensors: straight to the one-C-call path. None, with nothing done, where it does not
        apply."""
        ts = type(send)
        if ts is not type(recv) or not (ts is np.ndarray or ts is _torch_tensor_type):
            return None
        hit = self._fast_a2a.get((ts, send.dtype, send.nbytes))
        if hit is None or recv.dtype != send.dtype or recv.nbytes != send.nbytes:
            return None
        if ts is np.ndarray:
            if not (send.flags.c_contiguous and recv.flags.c_contiguous and
                    recv.flags.writeable):
                return None
            saddr, raddr = self.nat.addr_of(send), self.nat.addr_of(recv)
        else:
            if not (send.is_contiguous() and recv.is_contiguous()) or recv.is_cuda or \
                    send.is_cuda:
                return None
            saddr, raddr = send.data_ptr(), recv.data_ptr()
        return self.all_to_all_known(recv, saddr, raddr, hit)

    def all_to_all_hit(self, type_, dtype, nbytes):
        """The plan of an even all-to-all of (type, dtype, nbytes) seen and checked before,
        or None: the torch seam's hot path looks it up once per call."""
        return self._fast_a2a.get((type_, dtype, nbytes))

    def all_to_all_known(self, recv, saddr, raddr, hit):
        """Even-split all-to-all whose plan `hit` came from all_to_all_hit: arrival and data
        in one C call, by the algorithm rank 0 proposes (comms/algorithms/host/pairwise.py,
        direct.py). Send may be recv on an even number of ranks: this rank proposes paired
        rounds, which every rank then runs (A2A.agreed). Buffers that overlap otherwise
        (in place on an odd number of ranks) are read from a copy of send. None, with
        nothing done, on a closed or broken group."""
        count, code, plan, chunk, direct_mode = hit
        nbytes = count * dt.DTYPE_SIZES[code]
        ctx = self.ctx
        if self.closed or ctx.broken:
            return None
        in_place = saddr == raddr and self.size % 2 == 0
        if not in_place and saddr < raddr + nbytes and raddr < saddr + nbytes:
            aside = self.staging.scratch("aside", nbytes)
            self.nat.copy(aside.ctypes.data, saddr, nbytes)
            saddr = aside.ctypes.data
        ctx.op_id += 1
        measured = isinstance(plan, Measured) and not in_place
        mine = A2A.PAIRED if in_place else plan.propose() if isinstance(plan, Measured) else plan
        try:
            t0 = perf_counter()
            st, got = self.nat.alltoall_even_g(ctx.group, ctx.op_id, _A2A_CODE, saddr, raddr,
                                               count, code, _A2A_MASK, pairwise.CTRL,
                                               ctx.data_off, chunk, pairwise.NUM_SLOTS, mine,
                                               direct_mode)
            if st == Status.OK and measured and got in plan.kinds:
                plan.record(got, perf_counter() - t0)
            elif st == Status.OTHER_ALGORITHM:  # rank 0 runs another algorithm (general path)
                nb = count // self.size * dt.DTYPE_SIZES[code]
                sends = [[nb] * self.size] * self.size
                _run_a2a_kind(self._a2a_kind(got), ctx, saddr, raddr, sends[0], sends)
                return recv
        except BaseException as exc:
            ctx.abort(f"{type(exc).__name__}: {exc}")
            raise
        if st <= Status.READ_FAILED:
            direct.read_failed(ctx, Status.read_errno(st))
        if st:
            if st == Status.MISMATCH:
                ctx.check_headers(_A2A_CODE, _A2A_FIELDS)
            ctx.fail(st, got, "all_to_all")
        return recv

    def all_to_all(self, sb, rb, sc, rc, even):
        """Block q of sb goes to rank q; block p of rb comes from rank p. sc / rc: elements
        to / from each rank; even: no counts were given (every rank sends count/n to every
        rank, and the arrival header says it all)."""
        ctx, n = self.begin("all_to_all"), self.size
        es = dt.DTYPE_SIZES[sb.dtype]
        even = even and sc == rc
        # the algorithm must be the same on every rank: with even splits rank 0's proposal
        # (in its arrival header) is run, or paired rounds when any rank proposed them;
        # with counts it is chosen after arrival, from the largest send. An even split in
        # place (send is recv) on an even number of ranks proposes paired rounds, which
        # write each received chunk over one already sent (pairwise.py). Any other in-place
        # buffer is copied aside first: peers may read my send buffer (direct), and
        # pairwise rounds write received blocks over send blocks a later round still sends.
        in_place = even and n > 1 and n % 2 == 0 and sb.addr == rb.addr and \
            sb.nbytes == rb.nbytes
        saddr, keep = (sb.addr, None) if in_place else self.staging.unaliased(sb, rb)
        send, recv = sb.obj, rb.obj

        def go():
            if even:
                first = self._a2a_plan(sb.nbytes)
                mine = A2A.PAIRED if in_place else \
                    first.propose() if isinstance(first, Measured) else first
                ctx.arrive(_A2A_CODE, sb.count, sb.dtype, 1, mine, extra=saddr,
                           fields=_A2A_FIELDS)
                kind = self._a2a_kind(A2A.agreed([int(h[L.H_ROOT]) for h in ctx.headers]))
                sends = [[sc[0] * es] * n] * n
                _run_a2a_kind(kind, ctx, saddr, rb.addr, sends[0], sends)
                if kind != A2A.STAGED and \
                        type(send) is type(recv) and \
                        (type(send) is np.ndarray or _is_torch_tensor_type(type(send))):
                    # this (type, dtype, size) was checked once: later calls take one C call
                    self._fast_a2a[(type(send), send.dtype, sb.nbytes)] = (
                        sb.count, sb.dtype, first, pairwise.chunk_bytes(ctx), self.direct_mode)
                return
            ctx.arrive(_A2A_CODE, 0, sb.dtype, extra=saddr, meta=sc + rc)
            mats = self.published_counts()          # every rank's [send counts, recv counts]
            for p in range(n):
                if min(mats[p]) < 0:    # checked >= 0 where they were given: not a peer's
                    raise CommError(f"all_to_all: rank {self.ctx.who(p)} published negative "
                                    "split counts in its arrival (its segment is corrupt)")
            for p in range(n):
                for q in range(n):
                    if mats[p][q] != mats[q][n + p]:
                        raise ArgumentMismatch(
                            f"all_to_all: split counts disagree: rank {p} sends {mats[p][q]} "
                            f"elements to rank {q}, but rank {q} expects {mats[q][n + p]} from "
                            f"rank {p} (send_counts / recv_counts); no data was moved")
            sends = [[c * es for c in m[:n]] for m in mats]
            chosen = self._algo("all_to_all", max(sum(row) for row in sends))
            chosen.all_to_all(ctx, saddr, rb.addr, sends[self.rank], [c * es for c in rc], sends)
        self._run(go)
        return rb.obj

    def _a2a_plan(self, nbytes):
        """What this rank proposes for an even all-to-all of nbytes: an algorithm number
        (AllToAllAlgorithm), or on rank 0 a Measured choice between two of them where the
        Selector leaves it to measurement (Selector.measured_all_to_all)."""
        pair = self.selector.measured_all_to_all(nbytes) if self.rank == 0 else None
        if pair:
            return Measured(*(int(A2A.by_label(name)) for name in pair))
        return int(A2A.by_label(self.selector.choose("all_to_all", nbytes).algorithm))

    def _a2a_kind(self, kind):
        """The agreed proposal, checked: direct needs peers' buffers to be readable, paired
        rounds an even number of ranks."""
        if not 0 <= kind < len(A2A) or (kind == A2A.DIRECT and not self.direct_mode) or \
                (kind == A2A.PAIRED and self.size % 2):
            raise CommError(f"all_to_all: the ranks agreed on algorithm {kind}, which this "
                            "rank cannot run")
        return kind

    def _algo(self, coll, nbytes):
        return _COPY_ALGORITHMS[self.selector.choose(coll, nbytes).algorithm]

    def barrier(self):
        ctx = self.begin("barrier")
        self._run(ctx.arrive, COLL_CODES["barrier"])

    def _check_p2p(self):
        if self.closed:
            raise CommError("communicator is closed")
        self.ctx.check_usable()

    def send(self, b, dst, tag):
        self._check_p2p()
        self._run(self.p2p.send, b.addr, b.nbytes, dst, tag)

    def recv(self, b, src, tag):
        self._check_p2p()
        self._run(self.p2p.recv, b.addr, b.nbytes, src, tag)
        return b.obj

    # ---- the end ----------------------------------------------------------------------
    def close(self, during_operation=False):
        """Unmap and close. during_operation (a signal handler closing the group between
        the steps of one of its operations, which still reads the segments): abort, so the
        peers stop waiting for us, and leave the mappings to go with this object."""
        if self.closed:
            return
        self.closed = True
        self.staging.release()
        if during_operation:
            self.ctx.abort("closed during one of its operations (by a signal handler)")
            return
        self.ctx.closed = True
        self.transport.close()
