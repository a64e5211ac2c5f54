"""A group's ordered runner: its operations one at a time in issue order, inline on the
caller's thread when idle and allowed, else on one daemon progress thread; the group's
shutdown; run_in_order (a call in a group's issue order).

Imports no torch: a queued operation is whatever the runner's `new_pending` makes of it
(comms.torch.work._Pending, which carries the torch future).
"""
from __future__ import annotations

import collections
import threading

from comms.torch.constants import SHUTDOWN_GRACE_S


class _OrderedRunner:
    """Runs a group's operations one at a time in issue order: inline when idle and
    allowed, else on one daemon progress thread. Holds no reference to the group.

    new_pending(fn, result, what, stream) makes a queued operation: an object with `execute()`
    (runs fn, keeps its error), `complete()` (publishes the outcome, then sets `done`),
    `done` (a threading.Event) and `error`.
    """

    def __init__(self, name, new_pending):
        self.name = name
        self._new_pending = new_pending
        self._cv = threading.Condition(threading.Lock())
        self._queue = collections.deque()
        self.num_queued = 0          # queued or running on the thread; read without lock
        self.exec_lock = threading.Lock()  # one operation at a time, whichever thread runs it
        self._thread = None
        self.closed = False

    def submit(self, fn, result, inline_ok, what, stream=None):
        if not self.num_queued and inline_ok:
            if self.closed:
                raise RuntimeError(f"topocomm: process group {self.name!r} was shut down")
            with self.exec_lock:
                fn()
            return None
        pending = self._new_pending(fn, result, what, stream)
        with self._cv:
            if self.closed:
                raise RuntimeError(f"topocomm: process group {self.name!r} was shut down")
            self.num_queued += 1
            self._queue.append(pending)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name=f"topocomm-progress-{self.name}", daemon=True)
                self._thread.start()
            self._cv.notify()
        if threading.current_thread() is self._thread:
            # Issued from a future callback on the progress thread, whose caller may block
            # on the result (PowerSGD waits inside its callbacks): nothing else would run
            # the queue meanwhile, so run it here, in order, up to this operation.
            while not pending.done.is_set() and self._run_next():
                pass
        return pending

    def _run_next(self):
        with self._cv:
            if not self._queue:
                return False
            pending = self._queue.popleft()
        with self.exec_lock:
            pending.execute()
        pending.complete()
        with self._cv:  # counted until its callbacks ran: later calls queue behind them
            self.num_queued -= 1
        return True

    def _loop(self):
        while True:
            with self._cv:
                while not self._queue and not self.closed:
                    self._cv.wait()
                if not self._queue:
                    return
            self._run_next()

    def close(self, join_timeout_s):
        """Let queued operations finish (peers expect them), then stop the thread."""
        with self._cv:
            self.closed = True
            self._cv.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(join_timeout_s)
            return not thread.is_alive()
        return True

    def join(self, timeout_s):
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)


def _shutdown(runners, comm, join_timeout_s):
    """A group's end: let each runner finish its queue, close the Communicator, then give a
    runner that did not finish in time SHUTDOWN_GRACE_S more."""
    finished = [runner.close(join_timeout_s) for runner in runners]
    try:
        comm.close()
    finally:
        for runner, done in zip(runners, finished):
            if not done:  # closing the Communicator fails whatever op was stuck
                runner.join(SHUTDOWN_GRACE_S)


def run_in_order(pg, fn):
    """Run fn() in `pg`'s issue order (after the async work queued before it; on this thread
    when nothing is queued) and re-raise its error: for work built on the group's
    Communicator that must not overtake queued collectives."""
    runner = getattr(pg, "_runner", None)
    if runner is None:
        return fn()
    pending = runner.submit(fn, None, True, "ordered call")
    if pending is not None:
        pending.done.wait()
        if pending.error is not None:
            raise pending.error
    return None
