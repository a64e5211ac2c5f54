"""What the ranks of a group must share is agreed before data moves: the settings that decide
their algorithms (TOPOCOMM_ALGO), and whether the memory a rank passed can be moved (CUDA
buffers in a process that cannot copy device memory: the plan says so by name, on every
rank, and the group stays usable)."""
import threading

import numpy as np
import pytest

from comms.api.buffers import as_buf
from comms.core.errors import ArgumentMismatch, NoAlgorithm
from comms.kernels import device_copy
from comms.plan import select
from comms.testing import ThreadWorld


def _algo_per_thread(monkeypatch, per_rank):
    """TOPOCOMM_ALGO as each rank thread ("rank<r>") would read it from its own environment."""
    real = select._overrides

    def overrides():
        name = threading.current_thread().name
        if not name.startswith("rank"):
            return real()
        return select.parse_algo(per_rank.get(int(name[4:]), ""))
    monkeypatch.setattr(select, "_overrides", overrides)


@pytest.mark.parametrize("hosts", [None, "AB"])
def test_algo_given_to_one_rank_is_a_mismatch_naming_it(monkeypatch, hosts):
    """Rank 0 forces the ring, rank 1 does not: creation fails on both with an
    ArgumentMismatch naming TOPOCOMM_ALGO, before any data moves (rank 1 would otherwise
    return its own input unreduced while rank 0 waits)."""
    _algo_per_thread(monkeypatch, {0: "allreduce:ring"})
    with pytest.raises(ArgumentMismatch, match="TOPOCOMM_ALGO: ranks disagree.*allreduce:ring"):
        ThreadWorld(2, timeout=20.0, hosts=hosts)


def test_same_algo_everywhere_is_fine_and_runs(monkeypatch):
    monkeypatch.setenv("TOPOCOMM_ALGO", "allreduce:ring;broadcast:staged")
    with ThreadWorld(3) as w:
        out = w.run(lambda c: c.allreduce(np.full(5, c.rank + 1.0)))
    assert all(np.array_equal(o, np.full(5, 6.0)) for o in out)


@pytest.mark.parametrize("spec", ["ring", "allreduce=ring", "allreduce:ring;small"])
def test_algo_without_colon_is_an_error_naming_it(monkeypatch, spec):
    monkeypatch.setenv("TOPOCOMM_ALGO", spec)
    with pytest.raises(ValueError, match="TOPOCOMM_ALGO"):
        select.Selector(2, 64 << 10)


def test_settings_check_names_what_differs():
    a = select.settings_text([select.Selector(2, 64 << 10)])
    b = select.settings_text([select.Selector(2, 64 << 10, direct=None)])
    select.check_settings([a, a])
    with pytest.raises(ArgumentMismatch, match="TOPOCOMM_CMA"):
        select.check_settings([a, b])
    # a host's own choices are compared among that host's ranks only
    two = [select.settings_text([select.Selector(2, 64 << 10), select.Selector(n, 64 << 10)], h)
           for h, n in ((0, 2), (1, 3))]
    select.check_settings(two)


class FakeCudaArray:
    """What cupy or numba hand over: __cuda_array_interface__ (version 3)."""

    def __init__(self, n, ptr=0x7F0000001000, device=0):
        self.__cuda_array_interface__ = {"data": (ptr, False), "shape": (n,), "typestr": "<f4",
                                         "strides": None, "version": 3, "stream": 1}
        self.device = type("Device", (), {"id": device})()


def test_a_buf_describes_cuda_memory():
    b = as_buf(FakeCudaArray(6, device=1), "buf")
    assert (b.kind, b.device, b.stream, b.count, b.nbytes) == ("cuda", 1, 1, 6, 24)
    assert b.where() == "cuda:1" and not b.is_host
    h = as_buf(np.zeros(3, np.float32), "buf")
    assert (h.kind, h.device, h.stream) == ("host", None, None)
    with pytest.raises(ValueError, match="recv: array must be C-contiguous"):
        arr = FakeCudaArray(6)
        arr.__cuda_array_interface__ = dict(arr.__cuda_array_interface__, shape=(2, 3),
                                            strides=(4, 8))
        as_buf(arr, "recv")


@pytest.fixture
def no_gpu(monkeypatch):
    """This process cannot copy device memory (neither torch nor cupy reaches a GPU)."""
    monkeypatch.setattr(device_copy, "_chosen", None)
    monkeypatch.setattr(device_copy, "_why_none", "torch sees no GPU; cupy is not installed")


@pytest.mark.parametrize("hosts", [None, "AB"])
def test_collective_on_cuda_buffers_names_the_memory_kind_from_the_plan(no_gpu, hosts):
    """CUDA buffers where no engine can copy them: a NoAlgorithm (TypeError) naming the
    argument, the memory kind and why, before data moves; the rank(s) with host buffers
    raise ArgumentMismatch; the group stays usable."""
    with ThreadWorld(2, timeout=20.0, hosts=hosts) as w:
        def body(c):
            buf = FakeCudaArray(4) if c.rank == 0 else np.ones(4, np.float32)
            try:
                c.allreduce(buf)
            except (NoAlgorithm, ArgumentMismatch) as exc:
                err = exc
            x = np.ones(4, np.float32)
            c.allreduce(x)                               # still usable
            return type(err).__name__, str(err), x
        res = w.run(body)
    assert res[0][0] == "NoAlgorithm", res[0]
    assert "buf: cuda buffers cannot be moved in this process" in res[0][1]
    assert "torch sees no GPU" in res[0][1]
    assert res[1][0] == "ArgumentMismatch"
    assert all(np.array_equal(x, np.full(4, 2.0)) for _, _, x in res)


def test_every_collective_asks_the_plan_about_cuda_memory(no_gpu):
    with ThreadWorld(1) as w:
        c = w.comms[0]
        dev, host = FakeCudaArray(4), np.zeros(4, np.float32)
        calls = [lambda: c.broadcast(dev), lambda: c.allgather(host, dev),
                 lambda: c.reduce_scatter(dev, host), lambda: c.all_to_all(dev, host),
                 lambda: c.gather(dev, host), lambda: c.scatter(host, dev),
                 lambda: c.reduce(dev), lambda: c.allreduce(host, out=dev)]
        for call in calls:
            with pytest.raises(NoAlgorithm, match="cuda buffers cannot be moved"):
                w.run(lambda _c: call())
