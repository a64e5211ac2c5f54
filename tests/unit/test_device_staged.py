"""CUDA buffers staged through host memory (comms/algorithms/device/staged.py), the group
the plan names for "cuda" memory, checked here without a GPU: the device buffers are host
memory behind __cuda_array_interface__ and the copy engine is a memmove stand-in with the
real engines' methods. What differs on a GPU (pinned memory, streams) is in tests/gpu/."""
import ctypes
import threading

import numpy as np
import pytest

from comms import NoAlgorithm
from comms.kernels import device_copy
from comms.testing import ThreadWorld

pytestmark = pytest.mark.timeout(120)


class HostDevice:
    """A "cuda" array whose bytes are a numpy array's."""

    def __init__(self, values, dtype=np.float32):
        self._describe(np.array(values, dtype))      # a copy: collectives write into it

    @classmethod
    def view(cls, arr, owner=None):
        """A "cuda" array over arr's own bytes (no copy); owner is kept alive with it."""
        self = cls.__new__(cls)
        self._describe(arr)
        self.owner = owner
        return self

    def _describe(self, arr):
        self.host = arr
        self.__cuda_array_interface__ = {"data": (self.host.ctypes.data, False),
                                         "shape": self.host.shape,
                                         "typestr": self.host.dtype.str, "strides": None,
                                         "version": 3, "stream": 7}
        self.device = type("Device", (), {"id": 0})()


class MemmoveEngine:
    """The copy engines' methods on host memory; counts the copies and their streams."""
    name = "memmove"

    def __init__(self, fail_thread=None):
        self.copies, self.fail_thread = [], fail_thread

    def host_array(self, nbytes):
        return np.zeros(nbytes, np.uint8)

    def to_host(self, host, buf, offset=0):
        if threading.current_thread().name == self.fail_thread:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        self.copies.append(("to_host", host.nbytes, buf.stream))
        ctypes.memmove(host.ctypes.data, buf.addr + offset, host.nbytes)

    def to_device(self, buf, host, offset=0):
        self.copies.append(("to_device", host.nbytes, buf.stream))
        ctypes.memmove(buf.addr + offset, host.ctypes.data, host.nbytes)


@pytest.fixture
def engine(monkeypatch):
    monkeypatch.setenv("TOPOCOMM_CUDA_PATH", "staged")     # one host would take CUDA IPC
    eng = MemmoveEngine()
    monkeypatch.setattr(device_copy, "_chosen", eng)
    return eng


def _inputs(rank, count, dtype):
    rng = np.random.default_rng(1000 * rank + count)
    if np.dtype(dtype).kind == "f":
        return rng.integers(-8, 8, count).astype(dtype)    # exact sums in any order
    return rng.integers(-50, 50, count).astype(dtype)


def every_collective(c, ins, count, dtype, in_place_allgather=False):
    """Rank c.rank runs every collective on "device" buffers; {name: its result(s)}
    (check_every_collective checks them). tests/unit/test_device_ipc.py runs it too."""
    n, r, out = c.size, c.rank, {}
    x = HostDevice(ins[r], dtype)
    c.allreduce(x)
    out["allreduce"] = x.host.copy()
    x, y = HostDevice(ins[r], dtype), HostDevice(np.zeros(count), dtype)
    c.allreduce(x, op="max", out=y)
    out["allreduce max out"] = (x.host.copy(), y.host.copy())
    x = HostDevice(ins[r], dtype)
    c.reduce(x, root=1, op="min")
    out["reduce"] = x.host.copy()
    y = HostDevice(np.zeros(count // n), dtype)
    c.reduce_scatter(HostDevice(ins[r], dtype), y)
    out["reduce_scatter"] = y.host.copy()
    b = HostDevice(ins[r], dtype)
    c.broadcast(b, root=2)
    out["broadcast"] = b.host.copy()
    g = HostDevice(np.zeros(count * n), dtype)
    c.allgather(HostDevice(ins[r], dtype), g)
    out["allgather"] = g.host.copy()
    if in_place_allgather:
        g = HostDevice(np.zeros(count * n), dtype)
        g.host[r * count:(r + 1) * count] = ins[r]
        own = g.host[r * count:(r + 1) * count]
        c.allgather(HostDevice.view(own, g), g)
        out["allgather in place"] = g.host.copy()
    g = HostDevice(np.zeros(count * n), dtype) if r == 0 else None
    c.gather(HostDevice(ins[r], dtype), g, root=0)
    out["gather"] = g.host.copy() if g is not None else None
    s = HostDevice(np.zeros(count // n), dtype)
    c.scatter(HostDevice(ins[r], dtype) if r == 1 else None, s, root=1)
    out["scatter"] = s.host.copy()
    a = HostDevice(np.zeros(count), dtype)
    c.all_to_all(HostDevice(ins[r], dtype), a)
    out["all_to_all"] = a.host.copy()
    a = HostDevice(ins[r], dtype)
    c.all_to_all(a, a)                                          # in place
    out["all_to_all in place"] = a.host.copy()
    sc = [(r + q) % 3 for q in range(n)]                        # uneven
    rc = [(p + r) % 3 for p in range(n)]
    src = np.arange(sum(sc)) + 100 * r
    a = HostDevice(np.zeros(sum(rc)), dtype)
    c.all_to_all(HostDevice(src, dtype), a, sc, rc)
    out["all_to_all uneven"] = a.host.copy()
    return out


def check_every_collective(res, ins, count, dtype):
    """every_collective's results on every rank against numpy."""
    n = len(ins)
    stack = np.stack(ins)
    with np.errstate(over="ignore"):
        total = stack.sum(0).astype(dtype)
    blocks = count // n
    for r in range(n):
        got = res[r]
        assert np.array_equal(got["allreduce"], total)
        assert np.array_equal(got["allreduce max out"][0], ins[r])      # buf unchanged
        assert np.array_equal(got["allreduce max out"][1], stack.max(0))
        assert np.array_equal(got["reduce"], stack.min(0) if r == 1 else ins[r])
        assert np.array_equal(got["reduce_scatter"], total[r * blocks:(r + 1) * blocks])
        assert np.array_equal(got["broadcast"], ins[2])
        assert np.array_equal(got["allgather"], stack.reshape(-1))
        if "allgather in place" in got:
            assert np.array_equal(got["allgather in place"], stack.reshape(-1))
        assert got["gather"] is None if r else np.array_equal(got["gather"], stack.reshape(-1))
        assert np.array_equal(got["scatter"], ins[1][r * blocks:(r + 1) * blocks])
        want = np.concatenate([ins[p][r * blocks:(r + 1) * blocks] for p in range(n)])
        assert np.array_equal(got["all_to_all"], want)
        assert np.array_equal(got["all_to_all in place"], want)
        pieces = []
        for p in range(n):
            sc_p = [(p + q) % 3 for q in range(n)]
            start = sum(sc_p[:r])
            pieces.append(np.arange(sum(sc_p))[start:start + sc_p[r]] + 100 * p)
        assert np.array_equal(got["all_to_all uneven"], np.concatenate(pieces).astype(dtype))


@pytest.mark.parametrize("hosts", [None, "AAB"])
@pytest.mark.parametrize("dtype", [np.float32, np.int64, np.float16])
def test_every_collective_on_device_buffers_equals_numpy(engine, hosts, dtype):
    n, count = 3, 2 * 3 * 5      # divisible by n for the block collectives
    ins = [_inputs(r, count, dtype) for r in range(n)]
    with ThreadWorld(n, timeout=60, hosts=hosts) as w:
        def body(c):
            out = every_collective(c, ins, count, dtype)
            r = c.rank
            if r < 2:                                               # p2p
                m = HostDevice(ins[r] if r == 0 else np.zeros(count), dtype)
                c.send(m, 1) if r == 0 else c.recv(m, 0)
                out["p2p"] = m.host.copy()
            return out
        res = w.run(body)
    check_every_collective(res, ins, count, dtype)
    for r in range(2):
        assert np.array_equal(res[r]["p2p"], ins[0])
    # each copy ran on the stream the buffer's producer named
    assert engine.copies and all(stream == 7 for _, _, stream in engine.copies)


def test_in_place_stages_one_buffer_and_copies_only_what_moves(engine):
    with ThreadWorld(2, timeout=30) as w:
        def body(c):
            x = HostDevice(np.arange(6) + c.rank)
            c.allreduce(x)
            b = HostDevice(np.full(4, 5.0 if c.rank == 0 else 0.0))
            c.broadcast(b, root=0)
            return x.host.tolist(), b.host.tolist()
        res = w.run(body)
    assert res == [((np.arange(6) * 2 + 1).tolist(), [5.0] * 4)] * 2
    ops = [(kind, nbytes) for kind, nbytes, _ in engine.copies]
    # per rank: the all-reduce in and out (24 B); the broadcast: root in, the other out
    assert sorted(ops) == sorted([("to_host", 24), ("to_device", 24)] * 2 +
                                 [("to_host", 16), ("to_device", 16)])


def test_device_and_host_ranks_meet(engine):
    with ThreadWorld(2, timeout=30) as w:
        def body(c):
            x = HostDevice(np.ones(5)) if c.rank == 0 else np.full(5, 2.0, np.float32)
            c.allreduce(x)
            return (x.host if c.rank == 0 else x).tolist()
        assert w.run(body) == [[3.0] * 5] * 2


def test_a_failed_copy_to_the_host_raises_on_every_rank(monkeypatch):
    """Rank 1's device read fails: it takes part flagged, so rank 0 raises too (no wait for
    the timeout), and the group stays usable."""
    monkeypatch.setenv("TOPOCOMM_CUDA_PATH", "staged")
    monkeypatch.setattr(device_copy, "_chosen", MemmoveEngine(fail_thread="rank1"))
    with ThreadWorld(2, timeout=30) as w:
        def body(c):
            try:
                c.allreduce(HostDevice(np.ones(3)))
                err = None
            except (RuntimeError, ValueError) as exc:
                err = exc
            y = np.ones(2, np.float32)
            c.allreduce(y)
            return type(err).__name__, str(err), y.tolist()
        res = w.run(body)
    assert res[1][0] == "RuntimeError" and "illegal memory access" in res[1][1], res[1]
    assert res[0][0] == "ArgumentMismatch", res[0]
    assert all(y == [2.0, 2.0] for _, _, y in res)


def test_without_a_copy_engine_device_buffers_are_refused_by_name(monkeypatch):
    monkeypatch.setattr(device_copy, "_chosen", None)
    monkeypatch.setattr(device_copy, "_why_none", "torch sees no GPU; cupy is not installed")
    with ThreadWorld(1) as w:
        c = w.comms[0]
        with pytest.raises(NoAlgorithm, match="out: cuda buffers cannot be moved in this "
                                              "process .*torch sees no GPU"):
            w.run(lambda _c: c.allreduce(np.ones(2, np.float32), out=HostDevice(np.ones(2))))


# ---- hypothesis: the staged path equals the host path, bit for bit ----------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from comms.core import dtypes as dt  # noqa: E402

NP_DTYPES = {dt.F16: np.float16, dt.F32: np.float32, dt.F64: np.float64, dt.I8: np.int8,
             dt.U8: np.uint8, dt.I32: np.int32, dt.I64: np.int64, dt.BOOL: np.bool_}
OPS = [dt.SUM, dt.PROD, dt.MIN, dt.MAX, dt.BAND, dt.BOR, dt.BXOR]


def _random(rank, count, code, seed):
    rng = np.random.default_rng(seed * 1009 + rank)
    if code == dt.BOOL:
        return rng.random(count) < 0.5
    if code in (dt.F16, dt.F32, dt.F64):
        return rng.uniform(-4, 4, count).astype(NP_DTYPES[code])
    info = np.iinfo(NP_DTYPES[code])
    return rng.integers(info.min, info.max, count, dtype=NP_DTYPES[code], endpoint=True)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(n=st.sampled_from([2, 3, 4]), per=st.sampled_from([0, 1, 2, 7, 13, 1031, 20011]),
       code=st.sampled_from(list(NP_DTYPES)), op=st.sampled_from(OPS),
       seed=st.integers(0, 2**16))
def test_staged_equals_the_host_path(engine, worlds, n, per, code, op, seed):
    """Sizes 0 and primes (x n), every dtype and op: allreduce (in place and not),
    reduce_scatter, allgather and all_to_all on "device" buffers give the host path's bits."""
    if not dt.op_supported(code, op):
        return
    count = n * per
    npd = NP_DTYPES[code]
    ins = [_random(r, count, code, seed) for r in range(n)]

    def body(c):
        r, got = c.rank, []
        for staged in (False, True):
            def buf(values):
                return HostDevice(values, npd) if staged else np.array(values, npd)

            def host(b):
                return b.host if staged else b
            x = buf(ins[r])
            c.allreduce(x, op=op)
            y, z = buf(ins[r]), buf(np.zeros(count))
            c.allreduce(y, op=op, out=z)
            s = buf(np.zeros(per))
            c.reduce_scatter(buf(ins[r]), s, op=op)
            g = buf(np.zeros(count * n))
            c.allgather(buf(ins[r]), g)
            a = buf(np.zeros(count))
            c.all_to_all(buf(ins[r]), a)
            got.append([host(v).copy() for v in (x, y, z, s, g, a)])
        return got
    for host_path, staged_path in worlds(n).run(body):
        for h, s in zip(host_path, staged_path):
            assert h.dtype == s.dtype and np.array_equal(h, s, equal_nan=h.dtype.kind == "f")


class AsyncMemmoveEngine(MemmoveEngine):
    """With the pieced copies of a large all-reduce (done at once here); fail_piece: the
    wait for that piece's copy raises on thread fail_thread."""

    def __init__(self, fail_thread=None, fail_piece=None):
        super().__init__()
        self.fail_thread, self.fail_piece = fail_thread, fail_piece
        self.per_thread = {}            # thread name -> pieces copied to the host

    @property
    def pieces(self):
        return sum(self.per_thread.values())

    def to_host_async(self, host, buf, offset=0):
        self.to_host(host, buf, offset)
        name = threading.current_thread().name
        piece = self.per_thread.get(name, 0)
        self.per_thread[name] = piece + 1
        return name, piece

    def to_device_async(self, buf, host, offset=0):
        self.to_device(buf, host, offset)
        return None

    def wait(self, event):
        if event == (self.fail_thread, self.fail_piece):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")


@pytest.mark.parametrize("hosts", [None, "AAB"])
def test_a_large_all_reduce_is_staged_in_pieces(monkeypatch, hosts):
    """Pieces of 64 bytes here (8 MiB by default): the same bits as the host path for sums
    and averages, in place and not, and every piece went through its own copies."""
    from comms.algorithms.device import staged
    monkeypatch.setenv("TOPOCOMM_CUDA_PATH", "staged")
    monkeypatch.setattr(staged, "PIECE_BYTES", 64)
    monkeypatch.setattr(staged, "PIECED_MIN", 128)
    eng = AsyncMemmoveEngine()
    monkeypatch.setattr(device_copy, "_chosen", eng)
    n, count = 3, 101                       # 404 bytes of float32: 7 pieces, the last short
    ins = [_inputs(r, count, np.float32) for r in range(n)]
    with ThreadWorld(n, timeout=60, hosts=hosts) as w:
        def body(c):
            out = []
            for op in ("sum", "avg"):
                want = ins[c.rank].copy()
                c.allreduce(want, op=op)
                x = HostDevice(ins[c.rank])
                c.allreduce(x, op=op)                       # in place
                y, z = HostDevice(ins[c.rank]), HostDevice(np.zeros(count))
                c.allreduce(y, op=op, out=z)
                out.append((want, x.host.copy(), z.host.copy(), y.host.copy()))
            return out
        res = w.run(body)
    for r, per_op in enumerate(res):
        for want, x, z, y in per_op:
            assert np.array_equal(want, x) and np.array_equal(want, z)
            assert np.array_equal(y, ins[r])
    assert eng.pieces == n * 2 * 2 * 7


def test_a_failed_piece_raises_on_every_rank(monkeypatch):
    from comms.algorithms.device import staged
    monkeypatch.setenv("TOPOCOMM_CUDA_PATH", "staged")
    monkeypatch.setattr(staged, "PIECE_BYTES", 64)
    monkeypatch.setattr(staged, "PIECED_MIN", 128)
    monkeypatch.setattr(device_copy, "_chosen", AsyncMemmoveEngine("rank1", fail_piece=2))
    with ThreadWorld(2, timeout=30) as w:
        def body(c):
            try:
                c.allreduce(HostDevice(np.ones(100)))
                err = None
            except (RuntimeError, ValueError) as exc:
                err = type(exc).__name__
            y = np.ones(2, np.float32)
            c.allreduce(y)                          # the group is still usable
            return err, y.tolist()
        res = w.run(body)
    assert res == [("ArgumentMismatch", [2.0, 2.0]), ("RuntimeError", [2.0, 2.0])]
