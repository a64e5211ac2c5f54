"""Per-group state the algorithms work with: the mapped segments, the op counter, and
the waits that turn a dead, aborted or silent peer into an error instead of a hang."""
from __future__ import annotations

import ctypes
import os

import numpy as np

from comms.core import layout as L
from comms.core.log import log
from comms.core.errors import (ArgumentMismatch, CommError, CommTimeoutError,  # noqa: F401
                               PeerAbortedError, PeerDeadError)
from comms.core.status import Collective, Status



# the collective codes of the arrival header by API name, and back (comms/core/status.py)
COLL_CODES = {c.label: c for c in Collective}
COLL_NAMES = {c: c.label for c in Collective}


class Context:
    def __init__(self, rank, size, transport, layout, nat, timeout):
        self.rank, self.size = rank, size
        self.transport, self.layout, self.nat = transport, layout, nat
        self.seg = list(transport.seg_bases)
        self.pids = tuple(transport.pids)
        self.timeout = float(timeout)
        self.op_id = 0
        self.names = None  # group ranks of this context's ranks, when they differ (who())
        self.broken: str | None = None
        base = self.seg[rank]
        self.closed = False  # Communicator.close(): the segments are unmapped
        self.my_base = base
        self._headers = [[np.frombuffer((ctypes.c_int64 * L.NUM_HEADER_WORDS).from_address(
            b + L.header(par)), dtype=np.int64) for b in self.seg] for par in (0, 1)]
        self.aborts = tuple(b + L.ABORT if q != rank else 0 for q, b in enumerate(self.seg))
        self.waiters = tuple(b + L.WAITERS for b in self.seg)
        ctypes.c_uint64.from_address(base + L.PID).value = transport.pids[rank] or 0
        self.meta_offs = (layout.meta_at(0), layout.meta_at(1))
        self._all_peers: dict = {}
        self.data_off = layout.data
        # spin long only when every rank of the host can have its own core
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if size <= cpus:
            nat.set_spin(50e-6, 500e-6)
        else:
            nat.set_spin(2e-6, 20e-6)
        # constant arguments of the latency path, converted once (comms.kernels._native.group_new)
        self.group = nat.group_new(rank, size, tuple(self.seg), self.pids, self.timeout, L.ARRIVED,
                                   L.ABORT, L.WAITERS, L.header(0), L.header(1), layout.small(0),
                                   layout.small(1))

    # counters -------------------------------------------------------------------------
    def post(self, off, value):
        self.nat.post(self.my_base + off, value, self.waiters[self.rank])

    def peer_addrs(self, off, only=None):
        """Addresses of counter `off` in peers' segments; 0 for self and for ranks not in
        `only` (None = all peers, an int = one rank, else a collection of ranks)."""
        if only is None:
            addrs = self._all_peers.get(off)
            if addrs is None:  # the same few offsets every call: build each tuple once
                addrs = self._all_peers[off] = tuple(
                    b + off if q != self.rank else 0 for q, b in enumerate(self.seg))
            return addrs
        if isinstance(only, int):
            only = (only,)
        return tuple(b + off if q != self.rank and q in only else 0 for q, b in enumerate(self.seg))

    def wait(self, off, target, only=None, what=""):
        st, idx = self.nat.wait_all(self.peer_addrs(off, only), target, self.aborts, self.pids,
                                    self.waiters, self.timeout)
        if st:
            self.fail(st, idx, what)

    def who(self, idx):
        """The rank users know: a host's own group inside a multi-host one numbers its
        ranks from 0, `names` maps them back to the group's ranks."""
        return self.names[idx] if self.names is not None and 0 <= idx < len(self.names) else idx

    def fail(self, status, idx, what=""):
        """Turn a wait status into an exception; mark the group broken and tell peers."""
        where = f" during {what}" if what else ""
        if status == Status.TIMEOUT:
            exc = CommTimeoutError(f"rank {self.who(idx)} did not respond within {self.timeout:g}s{where} "
                                   f"(op {self.op_id}); it is slow, stuck or at another collective")
        elif status == Status.ABORTED:
            exc = PeerAbortedError(f"rank {self.who(idx)} aborted{where} (op {self.op_id})")
        elif status == Status.INTERRUPTED:
            exc = CommError(f"interrupted (SIGINT){where} (op {self.op_id}); the group is broken")
        elif status == Status.DEAD:
            exc = PeerDeadError(f"rank {self.who(idx)} (pid {self.pids[idx]}) died{where} (op {self.op_id})")
        elif status == Status.MISMATCH:
            exc = CommError(f"rank {self.who(idx)}'s arrival header disagrees with rank "
                            f"{self.who(0)}'s{where} (op {self.op_id}) but changed while it "
                            "was checked; the group is broken")
        else:
            exc = CommError(f"unexpected wait status {status}{where}")
        self.abort(str(exc))
        raise exc

    def abort(self, reason):
        if not self.broken:
            log.info("rank %s: the group is broken: %s", self.who(self.rank), reason)
        self.broken = reason
        if self.closed:  # closed meanwhile (a signal handler): its segment is gone
            return
        ctypes.c_uint64.from_address(self.my_base + L.ABORT).value = 1

    def check_usable(self):
        if self.broken:
            raise CommError(f"group is broken after an earlier error: {self.broken}")

    # arrival: the one synchronization every collective starts with ----------------------
    def next_op(self) -> int:
        self.op_id += 1
        return self.op_id

    def arrive(self, coll, count=0, dtype=0, op=0, root=-1, error=0, extra=0, meta=None,
               fields=(L.H_COLL, L.H_COUNT, L.H_DTYPE, L.H_OP, L.H_ROOT)):
        """Publish what this rank asks for (and `meta`, int64 words for the peers), wait for
        all, and check they agree, in one C call.

        Raises ArgumentMismatch (a ValueError) on every rank when any rank rejected its
        arguments or when the ranks disagree on `fields`: before any data moves.
        """
        k = self.op_id
        mask = 0
        for f in fields:
            mask |= 1 << f
        st, idx = self.nat.arrive_g(self.group, k, coll, count, dtype, op, root, error, extra,
                                    mask, self.meta_offs[k & 1], meta)
        if st == Status.MISMATCH:
            if self.check_headers(coll, fields) is None:
                # the C check saw a difference the words no longer show: a header that
                # changed while it was read is not a rank following the protocol
                self.fail(st, idx, COLL_NAMES.get(coll, "collective"))
        elif st:
            self.fail(st, idx, COLL_NAMES.get(coll, "collective"))

    @property
    def headers(self):
        """Every rank's header for the current op."""
        return self._headers[self.op_id % 2]

    def check_headers(self, coll, fields=(L.H_COLL, L.H_COUNT, L.H_DTYPE, L.H_OP, L.H_ROOT)):
        name = COLL_NAMES.get(coll, "collective")
        ref = self.headers[0]
        for q in range(self.size):
            h = self.headers[q]
            if h[L.H_ERROR]:
                if q == self.rank:
                    return "self"
                raise ArgumentMismatch(f"{name}: rank {self.who(q)} rejected its arguments (see the "
                                 f"error on rank {self.who(q)}); no data was moved")
        for q in range(self.size):
            h = self.headers[q]
            if h[L.H_COLL] != ref[L.H_COLL]:
                raise ArgumentMismatch(f"{name}: rank {self.who(q)} called {COLL_NAMES.get(int(h[L.H_COLL]), '?')} "
                                 f"while rank {self.who(0)} called {COLL_NAMES.get(int(ref[L.H_COLL]), '?')}")
            op_label = "split mode (even split vs send_counts/recv_counts)" \
                if coll == COLL_CODES["all_to_all"] else "op"
            checks = [(L.H_COUNT, "size (elements)"), (L.H_DTYPE, "dtype"), (L.H_OP, op_label),
                      (L.H_ROOT, "root")]
            if coll == COLL_CODES["all_to_all"]:  # the split mode explains a size difference
                checks.insert(0, checks.pop(2))
            for f, label in checks:
                if f in fields and h[f] != ref[f]:
                    from comms.core import dtypes as dt
                    a, b = int(h[f]), int(ref[f])
                    if f == L.H_DTYPE:
                        a, b = dt.DTYPE_NAMES.get(a, a), dt.DTYPE_NAMES.get(b, b)
                    if f == L.H_OP and coll != COLL_CODES["all_to_all"]:
                        a, b = dt.OP_NAMES.get(a, a), dt.OP_NAMES.get(b, b)
                    elif f == L.H_OP:
                        a, b = ("even" if a else "counts"), ("even" if b else "counts")
                    raise ArgumentMismatch(f"{name}: mismatched {label} across ranks: rank "
                                     f"{self.who(q)} has {a}, rank {self.who(0)} has {b}; no "
                                     "data was moved")
        return None
