"""comms/torch/work.py: wait() orders the caller's current CUDA stream after the stream the
operation was queued on (as NCCL's Work does), checked with stand-in streams: no GPU here."""
import pytest

torch = pytest.importorskip("torch")

from comms.torch import work as W  # noqa: E402


class Stream:
    def __init__(self, name):
        self.name, self.device, self.waited = name, "cuda:0", []

    def wait_stream(self, other):
        self.waited.append(other.name)


@pytest.mark.parametrize("queued", [False, True])
def test_wait_makes_the_current_stream_wait_for_the_operations(monkeypatch, queued):
    s1, s2 = Stream("s1"), Stream("s2")
    current = {"now": s2}
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current["now"])
    pending = None
    if queued:
        pending = W._Pending(lambda: None, [], "allreduce")
        pending.execute()
        pending.done.set()
    w = W.TopocommWork([], pending, stream=s1)
    assert w.wait() is True and s2.waited == ["s1"]
    current["now"] = s1                      # on the operation's own stream: nothing to wait
    assert w.wait() is True and s1.waited == []


def test_a_failed_operation_raises_without_ordering(monkeypatch):
    s1, s2 = Stream("s1"), Stream("s2")
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: s2)
    pending = W._Pending(lambda: 1 / 0, [], "allreduce")
    pending.execute()
    pending.done.set()
    with pytest.raises(ZeroDivisionError):
        W.TopocommWork([], pending, stream=s1).wait()
    assert s2.waited == []


def test_cpu_work_has_no_stream():
    assert W.TopocommWork([]).wait() is True
