"""Communicator: the framework-free API (numpy arrays, torch CPU tensors), in place.

Every collective follows the same shape:
  1. check the arguments locally (naming the bad one),
  2. arrive: publish what this rank asks for and check all ranks agree; a rank whose
     arguments were rejected still arrives (flagged), so every rank raises instead of
     waiting for it; nothing has moved yet, and the group stays usable,
  3. move data with the algorithm the selector chose (comms/algorithms/).
An error in step 3 (dead, aborted or silent peer) breaks the group: later calls raise.
"""
from __future__ import annotations

import ctypes
import functools
import os
import threading
import time
import weakref
from time import perf_counter

import numpy as np

from comms.core import dtypes as dt
from comms.core import layout as L
from comms.kernels import native
from comms.algorithms.host import allreduce as ar
from comms.algorithms.host import direct, pairwise, staged
from comms.algorithms.host.p2p import P2P
from comms.api.buffers import as_buf
from comms.core.context import COLL_CODES, ArgumentMismatch, Context
from comms.core.errors import CommError, check_tag
from comms.plan.select import Measured, Selector
from comms.core.store import everyones

DEFAULT_TIMEOUT_S = 300.0
# the modules behind the copy-only collectives' algorithm names (comms/plan/select.py)
_COPY_ALGORITHMS = {"direct": direct, "pairwise": pairwise, "staged": staged}

_torch_tensor_type = None  # torch.Tensor once one was seen (torch is never imported here)
_A2A_CODE = COLL_CODES["all_to_all"]
# an even all-to-all's root word carries the algorithm the rank proposes; rank 0's is run
_A2A_FIELDS = (L.H_COLL, L.H_COUNT, L.H_DTYPE, L.H_OP)
_A2A_MASK = sum(1 << f for f in _A2A_FIELDS)
# The even all-to-all's algorithms by the number a rank proposes in its arrival header (the
# same numbers as module.c alltoall_even_g). "pairwise-streamed": pairwise with streamed
# (non-temporal) slot writes, measured against plain pairwise where a group has no direct
# reads (comms/algorithms/host/pairwise.py).
_A2A_RUNS = {"pairwise": pairwise.all_to_all, "direct": direct.all_to_all,
             "staged": staged.all_to_all,
             "pairwise-streamed": functools.partial(pairwise.all_to_all, stream_in=True)}
_A2A_KINDS = tuple(_A2A_RUNS)
_A2A_STREAMED = _A2A_KINDS.index("pairwise-streamed")


def _run_a2a_kind(kind, ctx, saddr, raddr, sizes, all_sizes):
    """Run the even all-to-all algorithm number `kind` (_A2A_KINDS)."""
    _A2A_RUNS[_A2A_KINDS[kind]](ctx, saddr, raddr, sizes, sizes, all_sizes)


def _is_torch_tensor_type(t):
    """Whether t is torch.Tensor (remembered for the fast paths' type checks)."""
    global _torch_tensor_type
    if t is _torch_tensor_type:
        return True
    if t.__module__.startswith("torch") and t.__name__ == "Tensor":
        _torch_tensor_type = t
        return True
    return False


_seq_lock = threading.Lock()
_seq_weak: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_seq_by_id: dict = {}


def _next_seq(store, name, rank, size=None):
    """This new group's key namespace on the store, the same on all its ranks and fresh on
    the store's server: every rank adds 1 to a counter of joins for (name, size), so the
    k-th group of that name and size gets number k whatever store object wraps the server
    (torch puts a new PrefixStore around the same TCPStore each time a world is made, and
    names groups from "0" again after destroy_process_group). Stores without add: counted
    per store object and rank."""
    add = getattr(store, "add", None)
    if add is not None and size:
        joined = int(add(f"topocomm/{name}/joined/{size}", 1))
        return f"{size}x{(joined - 1) // size + 1}"
    with _seq_lock:
        try:
            counts = _seq_weak.setdefault(store, {})
        except TypeError:  # not weak-referenceable: count by id (kept alive by the caller)
            counts = _seq_by_id.setdefault(id(store), {})
        counts[(name, rank)] = counts.get((name, rank), 0) + 1
        return counts[(name, rank)]


def default_timeout() -> float:
    env = os.environ.get("TOPOCOMM_TIMEOUT")
    return float(env) if env else DEFAULT_TIMEOUT_S


class Communicator:
    """A group of `size` ranks; this object is rank `rank`.

    store: set(key, bytes) / get(key) -> bytes (blocking) / add(key, n); a torch Store works.
    transport: None (detect), "shm" or "threads": how ranks on one host talk. Ranks on
        different hosts talk over tcp (comms/api/multihost.py); the object is then a
        MultiHostCommunicator with the same methods.
    host: this rank's host key (default: topology.host.host_id(): hostname, boot id and
        network namespace; TOPOCOMM_HOST_ID overrides). Tests give threads different keys
        to emulate hosts.
    timeout: seconds a rank waits for a peer before raising CommError (TOPOCOMM_TIMEOUT).
    """

    def __init__(self, rank: int, size: int, store, *, timeout: float | None = None,
                 name: str = "world", transport: str | None = None,
                 layout: L.SegmentLayout | None = None, host: str | None = None):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size: must be a positive int, got {size!r}")
        if not isinstance(rank, int) or not 0 <= rank < size:
            raise ValueError(f"rank: must be in [0, {size}), got {rank!r}")
        self.rank, self.size = rank, size
        self.timeout = float(timeout) if timeout is not None else default_timeout()
        self.name = name
        self._nat = native.impl()
        prefix = f"topocomm/{name}/{_next_seq(store, name, rank, size)}"
        self._prefix = prefix
        try:
            self._create(store, prefix, transport, layout, host)
        except BaseException as exc:
            tr = self.__dict__.get("transport")
            if tr is not None and not isinstance(self, MultiHostCommunicator):
                tr.close()  # (a multi-host group closes what it made itself)
            # tell the peers, so that none keeps a group this rank does not have
            try:
                store.set(f"{prefix}/created/{rank}", f"{type(exc).__name__}: {exc}".encode())
            except Exception:  # noqa: BLE001 - the store itself may be what failed
                pass
            raise
        self._agree_created(store, prefix)

    def _agree_created(self, store, prefix):
        """Every rank says whether it created the group; a rank whose peer failed raises
        CommError now (and closes its side) rather than at its first collective's timeout."""
        for q, said in enumerate(everyones(store, f"{prefix}/created", self.rank, self.size,
                                           b"ok")):
            if said != b"ok":
                self.close()
                raise CommError(f"rank {q} failed to create group {self.name!r}: "
                                f"{said.decode(errors='replace')}")

    def _create(self, store, prefix, transport, layout, host):
        rank, size = self.rank, self.size
        if transport is None or host is not None:
            if host is None:
                from topology.host import host_id
                host = host_id()
            keys = [k.decode() for k in everyones(store, f"{prefix}/host", rank, size,
                                                  str(host).encode())]
            if len(set(keys)) > 1:
                first = {}
                for q, k in enumerate(keys):
                    first.setdefault(k, []).append(q)
                self.__class__ = MultiHostCommunicator
                self._init_multihost(store, list(first.values()), transport, layout)
                return
            transport = transport or "shm"
        self._layout = layout or L.SegmentLayout(size)
        if transport == "threads":
            from comms.transport.threads import ThreadsTransport
            tr = ThreadsTransport(rank, size, store, prefix, self._layout)
        elif transport == "shm":
            from comms.transport.shm import ShmTransport
            tr = ShmTransport(rank, size, store, prefix, self._layout)
        else:
            raise ValueError(f"transport: unknown {transport!r}; use 'shm' or 'threads'")
        self.transport = tr
        # how peers' buffers are read: 1 process_vm_readv, 2 memcpy (threads), 0 not at all
        self._direct_mode = {"cma": 1, "memcpy": 2}.get(getattr(tr, "direct", None), 0)
        self._ctx = Context(rank, size, tr, self._layout, self._nat, self.timeout)
        self._use_selector()
        self._p2p = P2P(self._ctx)
        self._closed = False
        # every rank's all-to-all counts as published at arrival, per parity (read-only views)
        self._meta_rows = [[(ctypes.c_int64 * (2 * size)).from_address(b + self._layout.meta_at(par))
                            for b in self._ctx.seg] for par in (0, 1)]
        # latency fast path of allreduce for numpy arrays: (dtype, op) -> (dtype code, op code)
        self._fast = {}
        # even-split all-to-all: (type, dtype, nbytes) -> (count, dtype code), once checked
        self._fast_a2a = {}
        if size > 1:
            self._calibrate()

    def _use_selector(self, link=None):
        """Build the choices (from the measured `link` when given) and the size limit of
        the small-allreduce fast path that follows from them."""
        self._selector = Selector(self.size, self._layout.small_bytes,
                                  getattr(self.transport, "direct", None),
                                  data_bytes=self._layout.data_bytes, link=link)
        forced = self._selector.forced.get("allreduce")
        self._fast_limit = 0 if forced and forced != "small" else self._selector.small_limit

    def _calibrate(self):
        """TOPOCOMM_PROBE=1: measure this group's links (topology/probe.py, a short
        ping-pong per link class, cached per machine) and rebuild the choices from them."""
        from topology import probe
        if not probe.is_enabled():
            return
        corrections = probe.measure(self)
        from topology.model import PathKind
        self._use_selector(corrections.get(PathKind.SAME_SOCKET)
                           or corrections.get(PathKind.SAME_HOST))

    # ----------------------------------------------------------------------------------
    is_multihost = False

    @property
    def is_native(self) -> bool:
        return native.is_native

    def explain(self, collective: str, nbytes: int, dtype: str = "float32") -> str:
        return self._selector.explain(collective, int(nbytes), dtype)

    def estimate_us(self, collective, nbytes): return self._selector.estimate_us(collective, nbytes)

    def _begin(self, coll):
        if self._closed:
            raise CommError("communicator is closed")
        self._ctx.check_usable()
        self._ctx.next_op()
        return self._ctx

    def reject(self, coll):
        """A layer above refused this rank's arguments for `coll` (the torch seam's checks):
        take part in that collective flagged, so every rank raises ArgumentMismatch before
        data moves and the group stays usable."""
        self._begin(coll)
        self._reject(coll)

    def _reject(self, coll):
        """Our arguments are bad: arrive flagged so peers raise too, then let the caller raise."""
        try:
            self._ctx.arrive(COLL_CODES[coll], error=1)
        except (CommError, ArgumentMismatch):
            pass

    def _run(self, fn, *args):
        try:
            return fn(*args)
        except (CommError, ArgumentMismatch):
            raise
        except BaseException as exc:  # interrupted mid-data-move: peers must not wait on us
            self._ctx.abort(f"{type(exc).__name__}: {exc}")
            raise

    @staticmethod
    def _op(op, dtype, name="op"):
        code = dt.op_code(op)
        if not dt.op_supported(dtype, code):
            raise TypeError(f"{name}: {dt.OP_NAMES[code]} is not supported for "
                            f"{dt.DTYPE_NAMES[dtype]}")
        return code

    def _check_blocks(self, sb, rb, whole):
        """send and recv of one dtype, the `whole` one holding size x the other."""
        if sb.dtype != rb.dtype:
            raise TypeError("recv: dtype must match send")
        big, small, part = (sb, rb, "recv") if whole == "send" else (rb, sb, "send")
        if big.count != self.size * small.count:
            raise ValueError(f"{whole}: must hold size x {part} = {self.size} x {small.count} "
                             f"elements, got {big.count}")

    def _root(self, root):
        if not isinstance(root, (int, np.integer)) or not 0 <= root < self.size:
            raise ValueError(f"root: must be in [0, {self.size}), got {root!r}")
        return int(root)

    # ---- argument checks, shared by one-host and multi-host groups ---------------------
    # Each returns the normalized arguments or raises TypeError/ValueError naming the bad one.
    def _args_reduce(self, buf, op, out, root=None):
        """buf (written in place when out is None, on the root only for reduce), out, op."""
        writable = out is None and (root is None or self.rank == root)
        sb = as_buf(buf, "buf", writable=writable)
        rb = sb if out is None else as_buf(out, "out", writable=True)
        if rb.count != sb.count or rb.dtype != sb.dtype:
            raise ValueError(f"out: must match buf ({sb.count} x {dt.DTYPE_NAMES[sb.dtype]}), "
                             f"got {rb.count} x {dt.DTYPE_NAMES[rb.dtype]}")
        return sb, rb, self._op(op, sb.dtype)

    def _args_reduce_scatter(self, send, recv, op):
        sb, rb = as_buf(send, "send"), as_buf(recv, "recv", writable=True)
        self._check_blocks(sb, rb, whole="send")
        return sb, rb, self._op(op, sb.dtype)

    def _args_allgather(self, send, recv):
        sb, rb = as_buf(send, "send"), as_buf(recv, "recv", writable=True)
        self._check_blocks(sb, rb, whole="recv")
        return sb, rb

    def _args_gather(self, send, recv, root):
        """(root, send, recv or None off the root)."""
        root = self._root(root)
        sb, rb = as_buf(send, "send"), None
        if self.rank == root:
            if recv is None:
                raise ValueError("recv: required on the root")
            rb = as_buf(recv, "recv", writable=True)
            self._check_blocks(sb, rb, whole="recv")
        return root, sb, rb

    def _args_scatter(self, send, recv, root):
        """(root, send or None off the root, recv)."""
        root = self._root(root)
        rb, sb = as_buf(recv, "recv", writable=True), None
        if self.rank == root:
            if send is None:
                raise ValueError("send: required on the root")
            sb = as_buf(send, "send")
            self._check_blocks(sb, rb, whole="send")
        return root, sb, rb

    def _args_all_to_all(self, send, recv, send_counts, recv_counts):
        """(send, recv, elements to each rank, elements from each rank)."""
        sb, rb = as_buf(send, "send"), as_buf(recv, "recv", writable=True)
        if sb.dtype != rb.dtype:
            raise TypeError("recv: dtype must match send")
        return (sb, rb, self._counts(send_counts, sb.count, "send_counts", "send"),
                self._counts(recv_counts, rb.count, "recv_counts", "recv"))

    # ----------------------------------------------------------------------------------
    def allreduce(self, buf, op="sum", out=None):
        """Reduce `buf` across ranks; the result goes to `out` (or `buf` when out is None)."""
        if type(op) is str and not self._closed and not self._ctx.broken:
            tb = type(buf)
            if tb is np.ndarray and out is None:
                hit = self._fast.get((tb, buf.dtype, op))
                if (hit is not None and buf.nbytes <= self._fast_limit and buf.flags.c_contiguous
                        and buf.flags.writeable):
                    addr = self._nat.addr_of(buf)
                    return self._allreduce_fast(buf, addr, addr, buf.size, hit)
            elif tb is np.ndarray and type(out) is np.ndarray:
                hit = self._fast.get((tb, buf.dtype, op))
                if (hit is not None and buf.nbytes <= self._fast_limit and out.dtype == buf.dtype
                        and out.size == buf.size and buf.flags.c_contiguous
                        and out.flags.c_contiguous and out.flags.writeable):
                    self._allreduce_fast(buf, self._nat.addr_of(buf), self._nat.addr_of(out),
                                         buf.size, hit)
                    return out
            elif tb is _torch_tensor_type and out is None:
                hit = self._fast.get((tb, buf.dtype, op))
                if hit is not None and buf.is_contiguous() and not buf.is_cuda:
                    count = buf.numel()
                    if count * dt.DTYPE_SIZES[hit[0]] <= self._fast_limit:
                        addr = buf.data_ptr()
                        return self._allreduce_fast(buf, addr, addr, count, hit)
        self._begin("allreduce")
        try:
            sb, rb, opc = self._args_reduce(buf, op, out)
        except (TypeError, ValueError):
            self._reject("allreduce")
            raise
        # out overlapping buf other than exactly (in place): the ring writes out ahead of
        # inputs it has not read yet, so it reads a copy
        in_addr, opr, keep = self._reduce_source(sb, rb, opc, 0)
        self._run(self._allreduce, in_addr, rb.addr, sb.count, sb.dtype, opr, "allreduce", -1)
        # float16 AVG is never cached: the one-call path would sum before dividing
        if type(op) is str and (out is None or type(out) is type(buf)) and \
                not (opc == dt.AVG and sb.dtype == dt.F16):
            if type(buf) is np.ndarray:
                self._fast[(np.ndarray, buf.dtype, op)] = (sb.dtype, opc)
            elif _is_torch_tensor_type(type(buf)):
                self._fast[(type(buf), buf.dtype, op)] = (sb.dtype, opc)
        return rb.obj

    def _allreduce_fast(self, buf, addr, out_addr, count, hit):
        """Small numpy or torch allreduce: everything was checked before for this
        (dtype, op); one C call does arrival, checks and the reduction."""
        ctx = self._ctx
        ctx.op_id += 1
        code, opc = hit
        avg = opc == dt.AVG
        try:
            st, idx = self._nat.allreduce_small_g(ctx.group, ctx.op_id, 1, -1, addr, out_addr, count,
                                                  code, dt.SUM if avg else opc,
                                                  self.size if avg else 0)
        except BaseException as exc:
            ctx.abort(f"{type(exc).__name__}: {exc}")
            raise
        if st:
            if st == 4:
                ctx.check_headers(COLL_CODES["allreduce"])
            ctx.fail(st, idx, "allreduce")
        return buf

    def _allreduce(self, in_addr, out_addr, count, dtype, opc, coll, root):
        avg_n = self.size if opc == dt.AVG else 0
        cop = dt.SUM if opc == dt.AVG else opc
        nbytes = count * dt.DTYPE_SIZES[dtype]
        choice = self._selector.choose(coll, nbytes)
        if choice.algorithm == "small":
            ar.small_allreduce(self._ctx, in_addr, out_addr, count, dtype, cop, avg_n, coll, root)
        else:  # every rank has the same size (checked at arrival), so the same chunk
            ar.ring_reduce(self._ctx, in_addr, out_addr, count, dtype, cop, avg_n, True, coll, root,
                           chunk_bytes=choice.chunk_bytes or ar.DEFAULT_CHUNK_BYTES)

    def reduce(self, buf, root=0, op="sum", out=None):
        """Reduce to `root` (into `out` or `buf` there); other ranks' buffers are unchanged."""
        self._begin("reduce")
        try:
            root = self._root(root)
            sb, rb, opc = self._args_reduce(buf, op, out, root)
        except (TypeError, ValueError):
            self._reject("reduce")
            raise
        in_addr, opr, aside = self._reduce_source(sb, rb if self.rank == root else None,
                                                  opc, 0)
        if self.rank == root:
            out_addr, keep = rb.addr, None
        else:
            keep = self._scratch("reduce", sb.nbytes)
            out_addr = keep.ctypes.data
        self._run(self._allreduce, in_addr, out_addr, sb.count, sb.dtype, opr, "reduce", root)
        return rb.obj

    def reduce_scatter(self, send, recv, op="sum"):
        """recv (on rank r) = reduction of block r of every rank's send (send = size blocks)."""
        ctx = self._begin("reduce_scatter")
        try:
            sb, rb, opc = self._args_reduce_scatter(send, recv, op)
        except (TypeError, ValueError):
            self._reject("reduce_scatter")
            raise
        # in place: recv is block `rank` of send
        saddr, opc, keep = self._reduce_source(sb, rb, opc, -self.rank * rb.nbytes)
        avg_n = self.size if opc == dt.AVG else 0
        cop = dt.SUM if opc == dt.AVG else opc
        chunk = self._selector.choose("reduce_scatter", sb.nbytes).chunk_bytes
        self._run(ar.ring_reduce, ctx, saddr, rb.addr, sb.count, sb.dtype, cop, avg_n, False,
                  "reduce_scatter", -1, rb.count, chunk or ar.DEFAULT_CHUNK_BYTES)
        return rb.obj

    def broadcast(self, buf, root=0):
        ctx = self._begin("broadcast")
        try:
            root = self._root(root)
            b = as_buf(buf, "buf", writable=self.rank != root)
        except (TypeError, ValueError):
            self._reject("broadcast")
            raise

        algo = self._algo("broadcast", b.nbytes)

        def go():
            ctx.arrive(COLL_CODES["broadcast"], b.count, b.dtype, 0, root, extra=b.addr)
            algo.broadcast(ctx, b.addr, b.nbytes, root)
        self._run(go)
        return b.obj

    def allgather(self, send, recv):
        """recv = every rank's send, rank-major (recv holds size x send elements)."""
        ctx = self._begin("allgather")
        try:
            sb, rb = self._args_allgather(send, recv)
        except (TypeError, ValueError):
            self._reject("allgather")
            raise

        algo = self._algo("allgather", rb.nbytes)
        # peers read my send while I write recv: direct reads need it apart from recv even
        # in place; the staged copies handle in place (send = my block of recv) only
        saddr, keep = self._unaliased(sb, rb) if algo is direct else \
            self._unaliased(sb, rb, self.rank * sb.nbytes)

        def go():
            ctx.arrive(COLL_CODES["allgather"], sb.count, sb.dtype, extra=saddr)
            algo.allgather(ctx, saddr, rb.addr, sb.nbytes)
        self._run(go)
        return rb.obj

    def gather(self, send, recv=None, root=0):
        ctx = self._begin("gather")
        try:
            root, sb, rb = self._args_gather(send, recv, root)
        except (TypeError, ValueError):
            self._reject("gather")
            raise
        raddr = rb.addr if rb is not None else 0
        saddr, keep = sb.addr, None
        if rb is not None:      # the root: in place when send is its own block of recv
            saddr, keep = self._unaliased(sb, rb, root * sb.nbytes)

        algo = self._algo("gather", sb.nbytes * self.size)

        def go():
            ctx.arrive(COLL_CODES["gather"], sb.count, sb.dtype, 0, root, extra=saddr)
            algo.allgather(ctx, saddr, raddr, sb.nbytes, root=root)
        self._run(go)
        return recv

    def scatter(self, send=None, recv=None, root=0):
        ctx = self._begin("scatter")
        try:
            root, sb, rb = self._args_scatter(send, recv, root)
        except (TypeError, ValueError):
            self._reject("scatter")
            raise
        saddr, keep = sb.addr if sb is not None else 0, None
        if sb is not None:      # the root: in place when recv is its own block of send
            saddr, keep = self._unaliased(sb, rb, -root * rb.nbytes)

        algo = self._algo("scatter", rb.nbytes * self.size)

        def go():
            ctx.arrive(COLL_CODES["scatter"], rb.count, rb.dtype, 0, root, extra=saddr)
            algo.scatter(ctx, saddr, rb.addr, rb.nbytes, root)
        self._run(go)
        return rb.obj

    def all_to_all(self, send, recv, send_counts=None, recv_counts=None):
        """Block q of send goes to rank q; block p of recv comes from rank p.

        send_counts[q] / recv_counts[p]: elements per peer (None: even split).
        """
        if send_counts is None and recv_counts is None:
            ts = type(send)
            hit = self._fast_a2a.get((ts, send.dtype, send.nbytes)) if ts is type(recv) and (
                ts is np.ndarray or ts is _torch_tensor_type) else None
            if hit is not None and recv.dtype == send.dtype and recv.nbytes == send.nbytes:
                saddr = 0
                if type(send) is np.ndarray:
                    if send.flags.c_contiguous and recv.flags.c_contiguous and recv.flags.writeable:
                        saddr, raddr = self._nat.addr_of(send), self._nat.addr_of(recv)
                elif send.is_contiguous() and recv.is_contiguous() and not recv.is_cuda \
                        and not send.is_cuda:
                    saddr, raddr = send.data_ptr(), recv.data_ptr()
                if saddr and self._all_to_all_fast(recv, saddr, raddr, hit) is not None:
                    return recv
        ctx, n = self._begin("all_to_all"), self.size
        try:
            sb, rb, sc, rc = self._args_all_to_all(send, recv, send_counts, recv_counts)
        except (TypeError, ValueError):
            self._reject("all_to_all")
            raise
        es = dt.DTYPE_SIZES[sb.dtype]
        even = send_counts is None and recv_counts is None and sc == rc
        # the algorithm must be the same on every rank: with even splits rank 0's proposal
        # (in its arrival header) is run; with counts it is chosen after arrival, from the
        # largest send. An in-place buffer is copied aside first, whatever the algorithm:
        # peers may read my send buffer (direct), and pairwise rounds write received
        # blocks over send blocks a later round still sends.
        saddr, keep = self._unaliased(sb, rb)

        def go():
            if even:  # every rank sends count/n to every rank: the header says it all
                first = self._a2a_plan(sb.nbytes)
                mine = first.propose() if isinstance(first, Measured) else first
                ctx.arrive(COLL_CODES["all_to_all"], sb.count, sb.dtype, 1, mine, extra=saddr,
                           fields=_A2A_FIELDS)
                kind = self._a2a_kind(int(ctx.headers[0][L.H_ROOT]))
                sends = [[sc[0] * es] * n] * n
                _run_a2a_kind(kind, ctx, saddr, rb.addr, sends[0], sends)
                if _A2A_KINDS[kind] != "staged" and keep is None and type(send) is type(recv) and \
                        (type(send) is np.ndarray or _is_torch_tensor_type(type(send))):
                    # this (type, dtype, size) was checked once: later calls take one C call
                    self._fast_a2a[(type(send), send.dtype, sb.nbytes)] = (
                        sb.count, sb.dtype, first, pairwise.chunk_bytes(ctx), self._direct_mode)
                return
            ctx.arrive(COLL_CODES["all_to_all"], 0, sb.dtype, extra=saddr, meta=sc + rc)
            rows = self._meta_rows[ctx.op_id % 2]
            mats = [row[:] for row in rows]          # every rank's [send counts, recv counts]
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

    def _all_to_all_fast(self, recv, saddr, raddr, hit):
        """Even-split all-to-all of a (type, dtype, size) seen before: arrival and data in one
        C call, by the algorithm rank 0 proposes (comms/algorithms/host/pairwise.py, direct.py).
        None, with nothing done, where it does not apply: a closed or broken group, or
        overlapping buffers (in place: the general path copies aside)."""
        count, code, plan, chunk, direct_mode = hit
        nbytes = count * dt.DTYPE_SIZES[code]
        ctx = self._ctx
        if self._closed or ctx.broken or not (saddr >= raddr + nbytes or raddr >= saddr + nbytes):
            return None
        ctx.op_id += 1
        measured = isinstance(plan, Measured)
        mine = plan.propose() if measured else plan
        try:
            t0 = perf_counter()
            st, got = self._nat.alltoall_even_g(ctx.group, ctx.op_id, _A2A_CODE, saddr, raddr,
                                                count, code, _A2A_MASK, pairwise.CTRL,
                                                ctx.data_off, chunk, pairwise.NUM_SLOTS, mine,
                                                direct_mode)
            if st == 0 and measured:
                plan.record(got, perf_counter() - t0)
            elif st == 5:  # rank 0 runs another algorithm (it took the general path)
                nb = count // self.size * dt.DTYPE_SIZES[code]
                sends = [[nb] * self.size] * self.size
                _run_a2a_kind(self._a2a_kind(got), ctx, saddr, raddr, sends[0], sends)
                return recv
        except BaseException as exc:
            ctx.abort(f"{type(exc).__name__}: {exc}")
            raise
        if st < -1:
            direct.read_failed(ctx, -st - 2)
        if st:
            if st == 4:
                ctx.check_headers(_A2A_CODE, _A2A_FIELDS)
            ctx.fail(st, got, "all_to_all")
        return recv

    def _a2a_plan(self, nbytes):
        """What this rank proposes for an even all-to-all of nbytes: an algorithm number
        (_A2A_KINDS), or on rank 0 a Measured choice between two of them
        where the Selector leaves it to measurement (Selector.measured_all_to_all)."""
        pair = self._selector.measured_all_to_all(nbytes) if self.rank == 0 else None
        if pair:
            return Measured(*(_A2A_KINDS.index(name) for name in pair))
        return _A2A_KINDS.index(self._selector.choose("all_to_all", nbytes).algorithm)

    def _a2a_kind(self, kind):
        """Rank 0's proposal, checked: direct needs peers' buffers to be readable."""
        if not 0 <= kind < len(_A2A_KINDS) or (kind == 1 and not self._direct_mode):
            raise CommError(f"all_to_all: rank 0 asked for algorithm {kind}, which this rank "
                            "cannot run")
        return kind

    def _algo(self, coll, nbytes):
        return _COPY_ALGORITHMS[self._selector.choose(coll, nbytes).algorithm]

    def _reduce_source(self, sb, rb, opc, inplace_at):
        """(address to reduce from, op to run, keep-alive or None) for a reduction of sb
        into rb: float16 AVG reads a pre-scaled copy (_premul_avg), anything else reads sb
        unless it overlaps rb other than in place (_unaliased; rb None: no overlap check)."""
        addr, opr, keep = self._premul_avg(sb.addr, sb.count, sb.dtype, opc)
        if keep is None and rb is not None:
            addr, keep = self._unaliased(sb, rb, inplace_at)
        return addr, opr, keep

    def _premul_avg(self, addr, count, dtype, opc):
        """AVG of float16, whose sums overflow at 65504 long before its means do: every rank
        contributes its input times 1/size to a SUM (NCCL's PreMulSum for float AVG), read
        from a copy. Other dtypes sum, then divide once (the more precise rounding).
        (address to reduce from, op to run, keep-alive or None)."""
        if opc != dt.AVG or dtype != dt.F16 or not count:
            return addr, opc, None
        keep = self._scratch("avg", count * dt.DTYPE_SIZES[dtype])
        self._nat.scale(keep.ctypes.data, addr, count, dtype, 1.0 / self.size)
        return keep.ctypes.data, dt.SUM, keep

    def _unaliased(self, sb, rb, inplace_at=None):
        """Where to read sb from in a collective that writes rb: sb itself unless the two
        overlap other than in the in-place layout the algorithms support (sb starts at
        rb's byte offset `inplace_at`: allreduce 0, allgather rank x block, ...; None: no
        overlap is safe); else a copy of it (kept with the group). (address, keep-alive or
        None)."""
        if not (sb.nbytes and rb.nbytes and sb.addr < rb.addr + rb.nbytes
                and rb.addr < sb.addr + sb.nbytes) or (
                    inplace_at is not None and sb.addr == rb.addr + inplace_at):
            return sb.addr, None
        keep = self._scratch("aside", sb.nbytes)
        self._nat.copy(keep.ctypes.data, sb.addr, sb.nbytes)
        return keep.ctypes.data, keep

    SCRATCH_KEEP_MAX = 256 << 20

    def _scratch(self, name, nbytes):
        """A uint8 buffer of at least nbytes for use within one call. Buffers up to
        SCRATCH_KEEP_MAX stay with the communicator and serve the next call: fresh memory
        costs page faults on every call (and on a VM that returns freed memory to its host,
        a host fault per page: ~2.5 ms per MiB here)."""
        bufs = self.__dict__.setdefault("_scratch_bufs", {})
        buf = bufs.get(name)
        if buf is not None and buf.nbytes >= nbytes:
            return buf
        buf = np.empty(max(int(nbytes), 64), np.uint8)
        if nbytes <= self.SCRATCH_KEEP_MAX:
            bufs[name] = buf
        return buf

    def _counts(self, counts, total, name, bufname):
        n = self.size
        if counts is None:
            if total % n:
                raise ValueError(f"{bufname}: {total} elements do not split evenly over {n} "
                                 f"ranks; pass {name}")
            return [total // n] * n
        try:
            c = [int(x) for x in counts]
            if any(int(x) != x for x in counts):
                raise TypeError
        except (TypeError, ValueError):
            raise ValueError(f"{name}: must be {n} integers (one per rank), got {counts!r}") from None
        if len(c) != n:
            raise ValueError(f"{name}: must be {n} integers (one per rank), got {len(c)}: {c}")
        if min(c, default=0) < 0:
            raise ValueError(f"{name}: negative count in {c}")
        if sum(c) != total:
            raise ValueError(f"{name}: counts sum to {sum(c)} but {bufname} holds {total} elements")
        return c

    def barrier(self):
        ctx = self._begin("barrier")
        self._run(ctx.arrive, COLL_CODES["barrier"])

    def send(self, buf, dst, tag=0):
        if self._closed:
            raise CommError("communicator is closed")
        self._ctx.check_usable()
        b = as_buf(buf, "buf")
        if not isinstance(dst, (int, np.integer)) or not 0 <= dst < self.size or dst == self.rank:
            raise ValueError(f"dst: must be another rank in [0, {self.size}), got {dst!r}")
        self._run(self._p2p.send, b.addr, b.nbytes, int(dst), check_tag(tag))

    def recv(self, buf, src, tag=0):
        if self._closed:
            raise CommError("communicator is closed")
        self._ctx.check_usable()
        b = as_buf(buf, "buf", writable=True)
        if not isinstance(src, (int, np.integer)) or not 0 <= src < self.size or src == self.rank:
            raise ValueError(f"src: must be another rank in [0, {self.size}), got {src!r}")
        self._run(self._p2p.recv, b.addr, b.nbytes, int(src), check_tag(tag))
        return b.obj

    # ----------------------------------------------------------------------------------
    def close(self):
        if self._closed:
            return
        self._closed = True
        if inside_own_operation(self):
            # a signal handler closing the group between the steps of one of its operations,
            # which still reads the segments: abort (the peers stop waiting for us) and leave
            # the mappings to go with this object
            self._ctx.abort("closed during one of its operations (by a signal handler)")
            self._release_kept()
            return
        self._ctx.closed = True
        self._release_kept()
        self.transport.close()

    def _release_kept(self):
        """The buffers kept for reuse go with the group: _scratch's and the MoE exchange's
        (comms/moe/exchange.py MOE_SCRATCH_ATTR); and the store comms.init() made for it."""
        self.__dict__.pop("_scratch_bufs", None)
        self.__dict__.pop("_moe_scratch_bufs", None)
        self._close_own_store()

    def _close_own_store(self):
        """Close the store comms.init() made for this group (bootstrap.py), if any."""
        store = self.__dict__.pop("_own_store", None)
        if store is None or not hasattr(store, "close"):
            return
        try:
            # rank 0 serves the store. It stops accepting first (a rank that goes on to a
            # new comms.init() must reach the next server, not this one) and says so; the
            # others wait for that, then everyone checks out and rank 0 stops it. Each wait
            # is bounded: a dead peer or server costs close() at most 5 s.
            pre = f"{self._prefix}/closing"
            deadline = time.monotonic() + min(self.timeout, 5.0)
            if self.rank == 0:
                if hasattr(store, "stop_accepting"):
                    store.stop_accepting()
                store.add(f"{pre}/server", 1)
            else:
                while not store.add(f"{pre}/server", 0) and time.monotonic() < deadline:
                    time.sleep(0.002)
            left = store.add(f"{pre}/ranks", 1)
            if self.rank == 0:
                while left < self.size and time.monotonic() < deadline:
                    time.sleep(0.002)
                    left = store.add(f"{pre}/ranks", 0)
        except Exception:  # a dead peer or server: nothing left to say goodbye to
            pass
        finally:
            store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()




def inside_own_operation(comm) -> bool:
    """Whether this thread is inside one of comm's operations (close() called from a signal
    handler that ran between its steps): a frame below the caller's has comm as `self`."""
    import sys
    f = sys._getframe(2)
    while f is not None:
        if f.f_locals.get("self") is comm:
            return True
        f = f.f_back
    return False


from comms.api.multihost import MultiHostMixin  # noqa: E402  (needs Communicator defined above)


class MultiHostCommunicator(MultiHostMixin, Communicator):
    """A Communicator whose ranks sit on several hosts (see comms/api/multihost.py)."""
