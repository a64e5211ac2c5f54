"""What a torch collective returns: TopocommWork (a ``dist.Work``), the shared completed Work
given back to blocking calls (_DONE), and _Pending, a queued operation with its torch
future (what the ordered runner, comms.torch.runner, queues and completes).

Works are ``dist.Work`` subclasses: ``wait()`` re-raises the operation's error (a Work made
from a future does not), ``get_future()`` yields the list of output tensors (what DDP's
reducer reads back). CUDA operations are queued on the caller's stream at the call; wait()
then makes the stream current at wait() wait for that one, as NCCL's Work does (no CPU wait
for the GPU).
"""
from __future__ import annotations

import threading

import torch
import torch.distributed as dist


def _future(stream):
    """A torch future; CUDA-aware on the stream's device when the operation ran on a CUDA
    stream (its wait() and value() then order the caller's current stream after it, as
    NCCL's futures do: DDP's reducer reads gradients through it)."""
    if stream is None:
        return torch.futures.Future()
    return torch.futures.Future(devices=[stream.device])


def _complete(future, result, stream):
    """Set the result, with the operation's stream current when it had one (a CUDA-aware
    future records its completion on the current stream of each device)."""
    if stream is None:
        future.set_result(result)
        return
    with torch.cuda.stream(stream):
        future.set_result(result)


class TopocommWork(dist.Work):
    """A topocomm operation's handle: completed (ran inline) or queued.

    ``wait()`` blocks until the operation finished and re-raises its error;
    ``get_future()`` completes with the list of output tensors.
    """

    def __init__(self, result, pending=None, stream=None):
        super().__init__()
        self._result = result
        self._pending = pending
        self._stream = stream       # the CUDA stream the operation was queued on, or None

    def _order_current_stream(self):
        """Work queued on the current stream from now on runs after the operation's."""
        s = self._stream
        if s is not None:
            current = torch.cuda.current_stream(s.device)
            if current != s:
                current.wait_stream(s)

    def wait(self, timeout=None):
        p = self._pending
        if p is None:
            self._order_current_stream()
            return True
        seconds = timeout.total_seconds() if timeout is not None else 0.0
        if seconds > 0:
            if not p.done.wait(seconds):
                raise RuntimeError(f"topocomm: operation {p.what} did not finish within "
                                   f"{seconds:.3f} s")
        else:
            p.done.wait()
        if p.error is not None:
            raise p.error
        self._order_current_stream()
        return True

    def is_completed(self):
        p = self._pending
        return p is None or p.done.is_set()

    def is_success(self):
        p = self._pending
        return p is None or (p.done.is_set() and p.error is None)

    def exception(self):
        p = self._pending
        return None if p is None else p.error

    def result(self):
        self.wait()
        return self._result

    def synchronize(self):
        pass

    def source_rank(self):
        raise NotImplementedError("topocomm: recv from any source is not supported")

    def get_future(self):
        p = self._pending
        if p is None:
            fut = _future(self._stream)
            _complete(fut, self._result, self._stream)
            return fut
        return p.future


# What a blocking dist.* call gets back: torch waits on it and drops it, so one shared
# completed Work saves building a new one (~2 us) per call.
_DONE = TopocommWork([])


class _Pending:
    """One queued operation: fn, the result its future yields, its outcome (`error`, `done`)."""

    __slots__ = ("fn", "result", "what", "done", "error", "future", "stream")

    def __init__(self, fn, result, what, stream=None):
        self.fn, self.result, self.what, self.stream = fn, result, what, stream
        self.done = threading.Event()
        self.error = None
        self.future = _future(stream)

    def execute(self):
        try:
            self.fn()
        except BaseException as exc:  # handed to wait()/the future, never lost
            self.error = exc
        self.fn = None

    def complete(self):
        # the future first: whoever wait() releases may read it at once. Its callbacks
        # (DDP comm hooks) run here, on the progress thread.
        if self.error is None:
            _complete(self.future, self.result, self.stream)
        else:
            self.future.set_exception(self.error)
        self.done.set()
