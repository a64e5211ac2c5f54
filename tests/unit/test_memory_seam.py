"""The seam a device path fills: select.MEMORY_GROUPS names, per memory kind, the group that
runs collectives on that memory; the Communicator routes Bufs of that kind to it without
knowing it. Here a stand-in "cuda" group whose memory is host memory behind a
__cuda_array_interface__ stages through the host group (the strategy a real device group
uses across hosts)."""
import dataclasses

import numpy as np
import pytest

from comms import NoAlgorithm
from comms.plan import select
from comms.testing import ThreadWorld

pytestmark = pytest.mark.timeout(60)


class HostBackedCuda:
    """A "cuda" array whose bytes are a numpy array's (so the stand-in group can read them)."""

    def __init__(self, values):
        self.host = np.ascontiguousarray(values, np.float32)
        self.__cuda_array_interface__ = {"data": (self.host.ctypes.data, False),
                                         "shape": self.host.shape, "typestr": "<f4",
                                         "strides": None, "version": 3, "stream": 1}
        self.device = type("Device", (), {"id": 0})()


class StagedStandIn:
    """What select.MEMORY_GROUPS names: built with (host group, store, prefix, timeout),
    runs COLLECTIVES with the host group's method names."""
    COLLECTIVES = ("allreduce", "broadcast")
    made = []

    def __init__(self, host, store, prefix, timeout):
        self.host, self.calls, self.closed = host, [], False
        StagedStandIn.made.append(self)

    @staticmethod
    def _on_host(b):
        return dataclasses.replace(b, kind="host", device=None, stream=None)

    def allreduce(self, send, recv, op, op_name):
        self.calls.append(("allreduce", send.where()))
        return self.host.allreduce(self._on_host(send), self._on_host(recv), op, op_name)

    def broadcast(self, buf, root):
        self.calls.append(("broadcast", buf.where()))
        return self.host.broadcast(self._on_host(buf), root)

    def close(self, during_operation=False):
        self.closed = True


@pytest.fixture
def stand_in(monkeypatch):
    StagedStandIn.made = []
    monkeypatch.setitem(select.MEMORY_GROUPS, "cuda", f"{__name__}:StagedStandIn")
    return StagedStandIn


def test_device_buffers_go_to_the_group_the_plan_names(stand_in):
    with ThreadWorld(2, timeout=20) as w:
        def body(c):
            x = HostBackedCuda(np.arange(4) + c.rank)
            c.allreduce(x)
            c.allreduce(x, op="max")
            b = HostBackedCuda(np.full(3, 7.0 if c.rank == 1 else 0.0))
            c.broadcast(b, root=1)
            return x.host.tolist(), b.host.tolist()
        res = w.run(body)
    summed = (np.arange(4) * 2 + 1).tolist()           # then max of equal values: unchanged
    assert res == [(summed, [7.0] * 3)] * 2
    assert len(stand_in.made) == 2                     # one per rank, made once
    assert all(g.calls == [("allreduce", "cuda:0")] * 2 + [("broadcast", "cuda:0")]
               for g in stand_in.made)
    assert all(g.closed for g in stand_in.made)        # closed with the Communicator


def test_host_and_device_ranks_meet_in_the_host_arrival(stand_in):
    with ThreadWorld(2, timeout=20) as w:
        def body(c):
            if c.rank == 0:
                x = HostBackedCuda(np.ones(5))
                c.allreduce(x)
                return x.host.tolist()
            y = np.full(5, 2.0, np.float32)
            c.allreduce(y)
            return y.tolist()
        assert w.run(body) == [[3.0] * 5] * 2


def test_unlisted_collective_and_mixed_memory_are_refused_naming_the_argument(stand_in):
    with ThreadWorld(1) as w:
        c = w.comms[0]
        dev, host = HostBackedCuda(np.ones(4)), np.zeros(4, np.float32)
        with pytest.raises(NoAlgorithm, match="send: no algorithm for cuda buffers"):
            w.run(lambda _c: c.allgather(dev, HostBackedCuda(np.ones(4))))
        with pytest.raises(NoAlgorithm, match="out: a host buffer where the other is in cuda"):
            w.run(lambda _c: c.allreduce(dev, out=host))
        x = np.ones(4, np.float32)
        w.run(lambda _c: c.allreduce(x))               # the group is untouched
        assert x.tolist() == [1.0] * 4
