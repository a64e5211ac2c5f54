"""Ranks as threads of one process over the threads transport: for unit tests and for
trying the library without launching processes.

    with ThreadWorld(4) as world:
        results = world.run(lambda comm: comm.allreduce(np.ones(3)))
"""
from __future__ import annotations

import queue
import threading

from comms.api.communicator import Communicator
from comms.core.layout import SegmentLayout
from comms.core.store import HashStore


class ThreadWorld:
    """`size` persistent rank threads, each with its own Communicator."""

    def __init__(self, size, timeout=30.0, data_bytes=256 << 10, small_bytes=16 << 10,
                 p2p_bytes=8 << 10, hosts=None):
        """hosts: one host key per rank (e.g. "AABB"): ranks with different keys talk over
        tcp (on TOPOCOMM_SOCKET_IFNAME, else the interface the topology picks), as if they
        were on different hosts."""
        self.size = size
        self.hosts = list(hosts) if hosts is not None else None
        self.timeout = timeout
        store = HashStore(max(timeout, 30.0))  # set-up may be slow on a loaded machine
        layout = SegmentLayout(size, small_bytes=small_bytes, p2p_bytes=p2p_bytes,
                               data_bytes=data_bytes)
        self._inbox = [queue.Queue() for _ in range(size)]
        self._outbox = [queue.Queue() for _ in range(size)]
        self.comms = [None] * size
        self._threads = []
        for r in range(size):
            t = threading.Thread(target=self._serve, args=(r, store, layout), daemon=True,
                                 name=f"rank{r}")
            t.start()
            self._threads.append(t)
        # every rank's outcome before raising the first error: a rank still creating its
        # group must not outlive the world that failed
        outcomes = [self._outbox[r].get(timeout=timeout) for r in range(size)]
        errors = [value for kind, value in outcomes if kind == "err"]
        if errors:
            self.close()            # the ranks that did create their group close it
            raise errors[0]

    def _serve(self, r, store, layout):
        try:
            self.comms[r] = Communicator(r, self.size, store, timeout=self.timeout,
                                         transport="threads", layout=layout,
                                         host=self.hosts[r] if self.hosts else None)
            self._outbox[r].put(("ok", None))
        except BaseException as exc:
            self._outbox[r].put(("err", exc))
            return
        while True:
            fn = self._inbox[r].get()
            if fn is None:
                return
            try:
                self._outbox[r].put(("ok", fn(self.comms[r])))
            except BaseException as exc:
                self._outbox[r].put(("err", exc))

    def run(self, fn, raise_errors=True):
        """fn(comm) on every rank at once; returns the per-rank results in rank order.

        With raise_errors=False, exceptions are returned in place of results.
        """
        for r in range(self.size):
            self._inbox[r].put(fn)
        out = []
        for r in range(self.size):
            kind, value = self._outbox[r].get(timeout=self.timeout * 2 + 10)
            out.append(value)
        if raise_errors:
            for v in out:
                if isinstance(v, BaseException):
                    raise v
        return out

    def close(self):
        for r in range(self.size):
            self._inbox[r].put(None)
        for t in self._threads:
            t.join(self.timeout)
        for c in self.comms:
            if c is not None:
                c.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def run_procs(n, code, timeout=120.0, env=None):
    """Run `code` (Python source) in n fresh processes with torchrun-style env; returns
    [(returncode, stdout, stderr)] in rank order. Every process is killed at the timeout."""
    import os
    import socket
    import subprocess
    import sys
    import time
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for r in range(n):
        e = dict(os.environ, RANK=str(r), WORLD_SIZE=str(n), LOCAL_RANK=str(r),
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **(env or {}))
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=e, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return collect(procs, time.monotonic() + timeout, "run_procs")


def collect(procs, deadline, who="collect"):
    """[(returncode, stdout, stderr)] of text-mode Popen objects, in order; at `deadline`
    (time.monotonic()) every one still running is killed. Interrupted (Ctrl-C), none is
    left running."""
    import subprocess
    import time
    out = []
    try:
        for p in procs:
            try:
                so, se = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                so, se = p.communicate()
                se += f"\n[{who}: killed at the deadline]"
            out.append((p.returncode, so, se))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    return out
