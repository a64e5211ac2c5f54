"""numpy-free Python twin of native/src/tcp.c: framed transfers over connected sockets,
every one progressed at once under one poll loop. Same signature, statuses and frame.

The sockets are non-blocking (comms/transport/tcp.py sets them so after the handshake)."""
from __future__ import annotations

import ctypes
import errno
import os
import select
import struct
import time

from comms.core.status import Status

FRAME_MAGIC = 0x54434D31
HDR = struct.Struct("<IIQQ")  # magic, flags, tag, nbytes
_SLICE_MS = 50
_CLOSED_ERRNOS = (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN)


class _Op:
    __slots__ = ("fd", "is_recv", "view", "nbytes", "tag", "hdr", "done")

    def __init__(self, fd, is_recv, addr, nbytes, tag):
        self.fd, self.is_recv, self.nbytes, self.tag = fd, bool(is_recv), nbytes, tag
        self.view = memoryview((ctypes.c_char * nbytes).from_address(addr)).cast("B") if nbytes else b""
        self.hdr = bytearray(HDR.size) if is_recv else bytearray(HDR.pack(FRAME_MAGIC, 0, tag, nbytes))
        self.done = 0


def _progress(o, got):
    """1 done, 0 would block, or -(status, errno)."""
    total = HDR.size + o.nbytes
    while o.done < total:
        if o.done < HDR.size:
            buf = memoryview(o.hdr)[o.done:]
        else:
            buf = o.view[o.done - HDR.size:]
        try:
            if o.is_recv:
                k = os.readv(o.fd, [buf])
                if k == 0:
                    return (Status.CLOSED, 0)
            else:
                k = os.write(o.fd, buf)
        except BlockingIOError:
            return 0
        except InterruptedError:
            continue
        except OSError as exc:
            return (Status.CLOSED if exc.errno in _CLOSED_ERRNOS else Status.ERRNO, exc.errno or 0)
        before = o.done
        o.done += k
        if o.is_recv and before < HDR.size <= o.done:
            magic, _flags, tag, nbytes = HDR.unpack(bytes(o.hdr))
            got[:] = [tag, nbytes]
            # checked before any payload byte lands in the user's buffer; a bad magic is told
            # apart (errno EPROTO) from a well-formed frame of another tag or size
            if magic != FRAME_MAGIC:
                return (Status.MISMATCH, errno.EPROTO)
            if tag != o.tag or nbytes != o.nbytes:
                return (Status.MISMATCH, 0)
    return 1


def tcp_exchange(ops, timeout_s, abort_addrs):
    """ops: (fd, is_recv, addr, nbytes, tag); -> (status, op_idx, errno, got_tag, got_nbytes)."""
    xs = [_Op(*o) for o in ops]
    queues = {}  # (fd, is_recv) -> op indices in list order
    for i, o in enumerate(xs):
        queues.setdefault((o.fd, o.is_recv), []).append(i)
    heads = {key: 0 for key in queues}
    remaining = len(xs)
    got = [0, 0]
    deadline = time.monotonic() + timeout_s
    poller = select.poll()
    while remaining:
        moved = False
        for key, q in queues.items():
            while heads[key] < len(q):
                i = q[heads[key]]
                r = _progress(xs[i], got)
                if r == 0:
                    break
                if r != 1:
                    return (r[0], i, r[1], got[0], got[1])
                heads[key] += 1
                remaining -= 1
                moved = True
        if not remaining:
            break
        if moved:
            continue
        for a, addr in enumerate(abort_addrs):
            if addr and ctypes.c_uint64.from_address(addr).value:
                return (Status.ABORTED, a, 0, 0, 0)
        left = deadline - time.monotonic()
        if left <= 0:
            pending = [q[heads[k]] for k, q in queues.items() if heads[k] < len(q)]
            return (Status.TIMEOUT, min(pending), 0, 0, 0)
        events = {}
        for (fd, is_recv), q in queues.items():
            if heads[(fd, is_recv)] < len(q):
                events[fd] = events.get(fd, 0) | (select.POLLIN if is_recv else select.POLLOUT)
        for fd, ev in events.items():
            poller.register(fd, ev)
        try:
            poller.poll(min(_SLICE_MS, int(left * 1000) + 1))
        finally:
            for fd in events:
                poller.unregister(fd)
    return (Status.OK, -1, 0, 0, 0)
