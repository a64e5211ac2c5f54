"""Collectives on device (CUDA) buffers through host memory: the group comms/plan/select.py
MEMORY_GROUPS names for "cuda".

staged (every collective, any number of GPUs per host, any number of hosts)
    steps: copy the device bytes this rank contributes into a pinned host buffer (ordered
    after the work queued on the buffer's stream: comms/kernels/device_copy.py); run the
    host group's collective on the host buffers (shared memory on one host, TCP between
    hosts: the same algorithms, selection and agreement as for host memory); copy the bytes
    this rank receives back into the device buffer. The call returns when the result is
    on the device.
    bytes per rank: the send once over PCIe (device to host) and the receive once back,
    plus the host collective's own traffic.
    in place (send and recv the same bytes): one host buffer, and the host collective's
    in-place path. Other overlaps of send and recv need no care: the whole send is on the
    host before anything is written back.
    pieces (all-reduce of at least PIECED_MIN bytes, where the copy engine queues copies):
    every piece's copy to the host is queued at once; piece i's host all-reduce starts when
    its copy is done and its result is queued back at once, so the copies of the other
    pieces overlap the host collective (across hosts: the network). Every rank splits alike
    (the pieces follow from the size); each piece is one host all-reduce, so the result is
    the same bits as in one piece.
    applies: every collective. A device-side path (one host, CUDA IPC) is faster on one
    host; across hosts the network step runs on host memory anyway.
    failure: in a collective, a rank whose staging fails (the copy to the host, a pinned
    allocation) takes part flagged (the host group's reject), so every rank raises instead
    of waiting for it. send / recv have no arrival to flag: the peer waits out its timeout,
    as with a peer that never calls.
"""
from __future__ import annotations

import contextlib

from comms.core import dtypes as dt
from comms.core.buffers import Buf
from comms.kernels import device_copy

PIECE_BYTES = 8 << 20       # one piece of a large staged all-reduce
PIECED_MIN = 2 * PIECE_BYTES


class StagedGroup:
    """Runs collectives on CUDA Bufs through `host` (the Communicator's HostGroup or
    MultiHostGroup), with the host group's method names and arguments."""

    HOW = ("staged: copied into pinned host memory, run by the host algorithm above, "
           "copied back (comms/algorithms/device/staged.py)")
    COLLECTIVES = ("allreduce", "reduce", "reduce_scatter", "broadcast", "allgather",
                   "gather", "scatter", "all_to_all", "send", "recv")

    def __init__(self, host, store, prefix, timeout):
        # no communication here: a rank may make this group alone (check_memory's rule)
        self.host = host
        self.engine = device_copy.engine()
        self._arrays: dict = {}      # role -> pinned host uint8 array, grown as needed
        self.closed = False

    @staticmethod
    def unavailable() -> str:
        """Why device buffers cannot be staged in this process ("" when they can)."""
        return device_copy.unavailable()

    # ---- staging -----------------------------------------------------------------------
    def _host_buf(self, role: str, like: Buf) -> Buf:
        """A host Buf with like's count and dtype, in this group's `role` array. Its owner
        is None: the host group then keeps no per-type shortcut for it."""
        arr = self._arrays.get(role)
        if arr is None or arr.nbytes < like.nbytes:
            arr = self._arrays[role] = self.engine.host_array(max(like.nbytes, 64))
        return Buf(arr.ctypes.data, like.count, like.dtype, None)

    def _view(self, role: str, nbytes: int):
        return self._arrays[role][:nbytes]

    def _in(self, role: str, dev: Buf) -> Buf:
        """dev copied into the `role` host buffer."""
        hb = self._host_buf(role, dev)
        self.engine.to_host(self._view(role, dev.nbytes), dev)
        return hb

    def _out(self, role: str, dev: Buf) -> None:
        self.engine.to_device(dev, self._view(role, dev.nbytes))

    @contextlib.contextmanager
    def _preparing(self, coll: str):
        """The staging before `coll`: a failure there (a device read, a pinned allocation)
        takes part in the collective flagged, so every rank raises instead of waiting."""
        try:
            yield
        except BaseException:
            self.host.reject(coll)
            raise

    def _pair(self, sb: Buf, rb: Buf):
        """Host Bufs for send (copied in) and recv: one buffer when they are the same
        bytes. (send, recv, recv's role)."""
        send = self._in("send", sb)
        if rb.addr == sb.addr and rb.nbytes == sb.nbytes:
            return send, send, "send"
        return send, self._host_buf("recv", rb), "recv"

    # ---- collectives (the host group's signatures) ---------------------------------------
    def allreduce(self, sb, rb, opc, op=None):
        if sb.nbytes >= PIECED_MIN and hasattr(self.engine, "to_host_async"):
            return self._allreduce_pieces(sb, rb, opc, op)
        with self._preparing("allreduce"):
            hs, hr, role = self._pair(sb, rb)
        self.host.allreduce(hs, hr, opc, op)
        self._out(role, rb)
        return rb.obj

    def _allreduce_pieces(self, sb, rb, opc, op):
        es = dt.DTYPE_SIZES[sb.dtype]
        step = max(PIECE_BYTES // es, 1) * es
        bounds = [(lo, min(sb.nbytes, lo + step)) for lo in range(0, sb.nbytes, step)]
        in_place = rb.addr == sb.addr and rb.nbytes == sb.nbytes
        with self._preparing("allreduce"):
            hs = self._host_buf("send", sb)
            hr = hs if in_place else self._host_buf("recv", rb)
            send = self._view("send", sb.nbytes)
            recv = send if in_place else self._view("recv", rb.nbytes)
            copied = [self.engine.to_host_async(send[lo:hi], sb, lo) for lo, hi in bounds]
            if not in_place and sb.addr < rb.addr + rb.nbytes and rb.addr < sb.addr + sb.nbytes:
                # send and recv overlap otherwise: all of send on the host before anything
                # is written back (the pieces' host collectives still overlap the copies back)
                self.engine.wait(copied[-1])
        back = None
        for (lo, hi), ev in zip(bounds, copied):
            with self._preparing("allreduce"):
                self.engine.wait(ev)
            count = (hi - lo) // es
            self.host.allreduce(Buf(hs.addr + lo, count, sb.dtype, None),
                                Buf(hr.addr + lo, count, sb.dtype, None), opc, op)
            back = self.engine.to_device_async(rb, recv[lo:hi], lo)
        self.engine.wait(back)      # the last piece's copy back: the stream's order has all
        return rb.obj

    def reduce(self, sb, rb, opc, root):
        with self._preparing("reduce"):
            hs, hr, role = self._pair(sb, rb)
        self.host.reduce(hs, hr, opc, root)
        if self.host.rank == root:
            self._out(role, rb)
        return rb.obj

    def reduce_scatter(self, sb, rb, opc, op=None):
        with self._preparing("reduce_scatter"):
            hs, hr = self._in("send", sb), self._host_buf("recv", rb)
        self.host.reduce_scatter(hs, hr, opc, op)
        self._out("recv", rb)
        return rb.obj

    def broadcast(self, b, root):
        with self._preparing("broadcast"):
            hb = self._in("send", b) if self.host.rank == root else self._host_buf("send", b)
        self.host.broadcast(hb, root)
        if self.host.rank != root:
            self._out("send", b)
        return b.obj

    def allgather(self, sb, rb):
        with self._preparing("allgather"):
            hs, hr = self._in("send", sb), self._host_buf("recv", rb)
        self.host.allgather(hs, hr)
        self._out("recv", rb)
        return rb.obj

    def gather(self, root, sb, rb):
        with self._preparing("gather"):
            hs = self._in("send", sb)
            hr = self._host_buf("recv", rb) if rb is not None else None
        self.host.gather(root, hs, hr)
        if rb is not None:
            self._out("recv", rb)
        return rb.obj if rb is not None else None

    def scatter(self, root, sb, rb):
        with self._preparing("scatter"):
            hs = self._in("send", sb) if sb is not None else None
            hr = self._host_buf("recv", rb)
        self.host.scatter(root, hs, hr)
        self._out("recv", rb)
        return rb.obj

    def all_to_all(self, sb, rb, sc, rc, even):
        with self._preparing("all_to_all"):
            hs, hr, role = self._pair(sb, rb)
        self.host.all_to_all(hs, hr, sc, rc, even)
        self._out(role, rb)
        return rb.obj

    def send(self, b, dst, tag):
        hb = self._in("p2p_send", b)
        self.host.send(hb, dst, tag)

    def recv(self, b, src, tag):
        hb = self._host_buf("p2p_recv", b)
        self.host.recv(hb, src, tag)
        self._out("p2p_recv", b)
        return b.obj

    def close(self, during_operation=False):
        """Drop the host buffers (the host group closes with its Communicator)."""
        self.closed = True
        self._arrays.clear()
