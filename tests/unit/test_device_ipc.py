"""Collectives on CUDA buffers by CUDA IPC (comms/algorithms/device/ipc.py), checked without
a GPU: ranks are threads, the "device" buffers are host memory behind
__cuda_array_interface__, the IPC runtime is a stand-in with the driver's methods
(comms/transport/cuda_ipc.py) that logs events, and the kernels are the torch fold on CPU
tensors (comms/kernels/cuda.py TorchKernels). What this checks: the exchange and agreement,
the plan (who reduces or copies what, one GPU and several), in-place handling, the fallback
to the staged path, and the failures. tests/gpu runs the same path on a GPU."""
import contextlib
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from comms.algorithms.device import ipc as ipc_algo
from comms.core import dtypes as dt
from comms.kernels import cuda, device_copy
from comms.testing import ThreadWorld
from comms.transport import cuda_ipc
from tests.unit.test_device_staged import (HostDevice, MemmoveEngine, check_every_collective,
                                           every_collective)

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.timeout(120)


class FakeIpc:
    """The DriverIpc methods on host memory. gpus: thread name -> GPU id (default one GPU);
    fail: {thread name: method} raises there."""
    name = "fake"

    def __init__(self, gpus=None, fail=None, cannot_export=()):
        self.gpus, self.fail = gpus or {}, fail or {}
        self.cannot_export = set(cannot_export)
        self.lock = threading.Lock()
        self.log = []
        self.events = 0
        self.live_events = set()

    def _maybe_fail(self, what):
        if self.fail.get(threading.current_thread().name) == what:
            raise RuntimeError(f"CUDA error in {what}: an illegal memory access")

    @contextlib.contextmanager
    def on(self, device):
        yield

    def gpu_id(self, device):
        return self.gpus.get(threading.current_thread().name, "0000:18:00.0")

    def device_of(self, addr):
        return 0

    def export(self, addr):
        self._maybe_fail("export")
        if threading.current_thread().name in self.cannot_export:
            raise RuntimeError("CUDA_ERROR_INVALID_VALUE (expandable segment)")
        return addr.to_bytes(8, "little").ljust(64, b"\0"), 0

    def open(self, handle, device):
        return int.from_bytes(handle[:8], "little")

    def touch(self, keys):
        pass

    def new_event(self):
        with self.lock:
            self.events += 1
            self.live_events.add(self.events)
            return self.events, self.events.to_bytes(8, "little").ljust(64, b"\0")

    def open_event(self, handle):
        raise AssertionError("ranks of one process use their events directly")

    def local_event(self, handle):
        ev = int.from_bytes(handle[:8], "little")
        assert ev in self.live_events
        return ev

    def synchronize_event(self, ev):
        assert ev in self.live_events

    def destroy_event(self, ev):
        with self.lock:
            self.live_events.discard(ev)

    def record(self, ev, stream):
        self._maybe_fail("record")
        with self.lock:
            self.log.append((threading.current_thread().name, "record", ev, stream))

    def wait(self, stream, ev):
        with self.lock:
            self.log.append((threading.current_thread().name, "wait", ev, stream))


class CountingKernels(cuda.TorchKernels):
    """The torch fold on CPU tensors, counting who ran what; named as the cupy kernels
    (which read any GPU's memory) unless name="torch"."""

    def __init__(self, fail_thread=None, name="stand-in"):
        super().__init__(torch, "cpu")
        self.name = name
        self.calls, self.fail_thread = [], fail_thread
        self.lock = threading.Lock()

    def reduce(self, outs, ins, count, dtype, op, stream, device, scale=None, premul=False):
        if threading.current_thread().name == self.fail_thread:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        with self.lock:
            self.calls.append((threading.current_thread().name, "reduce", len(ins),
                               len(outs), count))
        super().reduce(outs, ins, count, dtype, op, stream, device, scale, premul)

    def copy(self, dst, src, nbytes, stream, device):
        with self.lock:
            self.calls.append((threading.current_thread().name, "copy", nbytes))
        super().copy(dst, src, nbytes, stream, device)


@pytest.fixture
def fake(monkeypatch):
    """Install a FakeIpc (and counting kernels); returns a function to reconfigure them."""
    monkeypatch.setenv("TOPOCOMM_CUDA_PATH", "auto")
    monkeypatch.setattr(device_copy, "_chosen", MemmoveEngine())

    def install(**kw):
        fail_thread = kw.pop("kernel_fails_on", None)
        name = kw.pop("kernels", "stand-in")
        f, k = FakeIpc(**kw), CountingKernels(fail_thread, name)
        monkeypatch.setattr(cuda_ipc, "_opened", f)
        monkeypatch.setattr(cuda, "_chosen", k)
        return f, k
    return install


def _inputs(rank, count, dtype):
    rng = np.random.default_rng(1000 * rank + count)
    return rng.integers(-8, 8, count).astype(dtype)


@pytest.mark.parametrize("gpus", ["one", "several"])
@pytest.mark.parametrize("dtype", [np.float32, np.int64, np.float16])
def test_every_collective_by_ipc_equals_numpy(fake, gpus, dtype):
    n, count = 3, 2 * 3 * 5
    ids = {} if gpus == "one" else {f"rank{q}": f"0000:{0x18 + q:02x}:00.0" for q in range(n)}
    f, k = fake(gpus=ids)
    ins = [_inputs(r, count, dtype) for r in range(n)]
    with ThreadWorld(n, timeout=60) as w:
        res = w.run(lambda c: every_collective(c, ins, count, dtype, in_place_allgather=True))
        paths = w.run(lambda c: (c._memory_groups["cuda"].path(),
                                 c._memory_groups["cuda"].ipc.last))
    check_every_collective(res, ins, count, dtype)
    assert paths == [("ipc", "one GPU" if gpus == "one" else "several GPUs")] * n
    workers = {name for name, *_ in k.calls}
    reduces = [c for c in k.calls if c[1] == "reduce"]
    if gpus == "one":
        # one process queues the work: the leader (rank 0, or the root of a rooted copy)
        assert workers <= {"rank0", "rank1", "rank2"}
        assert {name for name, *_ in reduces} == {"rank0"}
        # all-reduce: one kernel reading 3 inputs and writing 3 outputs
        assert ("rank0", "reduce", 3, 3, count) in reduces
    else:
        # each rank reduces its own block of an all-reduce and pulls its own copies
        assert {name for name, *_ in reduces} == {"rank0", "rank1", "rank2"}
    # the staged path never ran: nothing went through host memory
    assert not device_copy._chosen.copies
    # every rank recorded ready and done events on the buffer's stream (7)
    assert all(stream == 7 for *_, stream in f.log)


def test_each_rank_waits_for_the_peers_before_and_after(fake):
    f, _ = fake()
    with ThreadWorld(2, timeout=30) as w:
        w.run(lambda c: c.allreduce(HostDevice(np.ones(8))))
    by = {name: [(what, ev) for name2, what, ev, _ in f.log if name2 == name]
          for name in ("rank0", "rank1")}
    # the leader: ready, wait for rank 1's ready, done; rank 1: ready, done, then waits for
    # the leader's done
    assert [w for w, _ in by["rank0"]] == ["record", "wait", "record"]
    assert [w for w, _ in by["rank1"]] == ["record", "record", "wait"]


def test_a_buffer_that_cannot_be_mapped_runs_that_call_staged_on_every_rank(fake):
    f, k = fake(cannot_export={"rank1"})
    with ThreadWorld(2, timeout=30) as w:
        def body(c):
            x = HostDevice(np.arange(4) + c.rank)
            c.allreduce(x)
            return x.host.tolist(), c._memory_groups["cuda"].path()
        res = w.run(body)
    assert res == [([1.0, 3.0, 5.0, 7.0], "ipc")] * 2       # staged this call, ipc later
    assert not k.calls and len(device_copy._chosen.copies) == 4


def test_a_rank_without_ipc_turns_every_rank_to_staged_for_good(fake, monkeypatch):
    f, k = fake()
    real_applies = ipc_algo.IpcGroup.__init__

    def init(self, host, ipc, kernels, why_not=""):
        if host.rank == 1:
            ipc, why_not = None, "the CUDA driver cannot be used (test)"
        real_applies(self, host, ipc, kernels, why_not)
    monkeypatch.setattr(ipc_algo.IpcGroup, "__init__", init)
    with ThreadWorld(2, timeout=30) as w:
        def body(c):
            out = []
            for _ in range(2):
                x = HostDevice(np.arange(3) + c.rank)
                c.allreduce(x)
                out.append(x.host.tolist())
            return out, c._memory_groups["cuda"].path(), c._memory_groups["cuda"].ipc.off
        res = w.run(body)
    assert res == [([[1.0, 3.0, 5.0]] * 2, "staged", "rank 1 cannot map device memory")] * 2
    assert not k.calls


def test_mismatched_arguments_raise_on_every_rank_before_data_moves(fake):
    f, k = fake()
    with ThreadWorld(2, timeout=30) as w:
        def body(c):
            x = HostDevice(np.ones(4 if c.rank == 0 else 5))
            with pytest.raises(ValueError, match="count"):
                c.allreduce(x)
            a = HostDevice(np.zeros(4))
            sc = [2, 2] if c.rank == 0 else [1, 3]
            with pytest.raises(ValueError, match="sends .* elements to rank"):
                c.all_to_all(HostDevice(np.ones(4)), a, sc, [2, 2])
            y = HostDevice(np.ones(2))
            c.allreduce(y)                                   # the group is still usable
            return y.host.tolist()
        assert w.run(body) == [[2.0, 2.0]] * 2
    assert [c[1] for c in k.calls] == ["reduce"]


@pytest.mark.parametrize("where", ["record", "kernel"])
def test_a_rank_whose_device_work_fails_makes_every_rank_raise(fake, where):
    if where == "record":
        fake(fail={"rank1": "record"})
    else:
        fake(kernel_fails_on="rank0")
    with ThreadWorld(2, timeout=30) as w:
        def body(c):
            try:
                c.allreduce(HostDevice(np.ones(3)))
                return None
            except Exception as exc:  # noqa: BLE001
                return type(exc).__name__, str(exc)
        res = w.run(body)
    failing = 1 if where == "record" else 0
    assert res[failing][0] == "RuntimeError" and "illegal memory access" in res[failing][1]
    other = res[1 - failing]
    assert other is not None and other[0] in ("ArgumentMismatch", "CommError"), other


def test_torch_kernels_across_gpus_run_staged(fake):
    """The torch fallback can view a peer's memory only on the peer's GPU."""
    f, k = fake(gpus={"rank0": "gpu-a", "rank1": "gpu-b"}, kernels="torch")
    with ThreadWorld(2, timeout=30) as w:
        def body(c):
            x = HostDevice(np.arange(3) + c.rank)
            c.allreduce(x)
            return x.host.tolist()
        assert w.run(body) == [[1.0, 3.0, 5.0]] * 2
    assert not k.calls and device_copy._chosen.copies


def test_sum_against_avg_is_a_mismatch(fake):
    fake()
    with ThreadWorld(2, timeout=30) as w:
        def body(c):
            with pytest.raises(ValueError, match="disagree on op"):
                c.allreduce(HostDevice(np.ones(2)), op="sum" if c.rank == 0 else "avg")
            x = HostDevice(np.full(2, 2.0 * (c.rank + 1)))
            c.allreduce(x, op="avg")
            return x.host.tolist()
        assert w.run(body) == [[3.0, 3.0]] * 2


def test_after_a_failed_call_every_rank_runs_staged(fake):
    f, k = fake(kernel_fails_on="rank0")
    with ThreadWorld(2, timeout=30) as w:
        def body(c):
            with pytest.raises((RuntimeError, ValueError)):
                c.allreduce(HostDevice(np.ones(3)))
            x = HostDevice(np.ones(3))
            c.allreduce(x)
            return x.host.tolist(), c._memory_groups["cuda"].path()
        assert w.run(body) == [([2.0] * 3, "staged")] * 2


def test_closing_destroys_the_groups_events(fake):
    f, _ = fake()
    with ThreadWorld(2, timeout=30) as w:
        w.run(lambda c: c.allreduce(HostDevice(np.ones(2))))
        assert f.live_events
    assert not f.live_events


def test_more_ranks_than_one_kernel_takes_run_staged(fake, monkeypatch):
    monkeypatch.setattr(ipc_algo, "MAX_SOURCES", 2)
    f, k = fake()
    def body(c):
        x = HostDevice(np.ones(2))
        c.allreduce(x)
        return x.host.tolist(), c._memory_groups["cuda"].path()
    with ThreadWorld(3, timeout=30) as w:
        res = w.run(body)
    assert res == [([3.0, 3.0], "staged")] * 3 and not k.calls


NP_DTYPES = {dt.F16: np.float16, dt.F32: np.float32, dt.F64: np.float64, dt.I8: np.int8,
             dt.U8: np.uint8, dt.I32: np.int32, dt.I64: np.int64, dt.BOOL: np.bool_}
OPS = [dt.SUM, dt.PROD, dt.MIN, dt.MAX, dt.BAND, dt.BOR, dt.BXOR, dt.AVG]


def _random(rank, count, code, seed):
    rng = np.random.default_rng(seed * 1009 + rank)
    if code == dt.BOOL:
        return rng.random(count) < 0.5
    if code in (dt.F16, dt.F32, dt.F64):
        return rng.uniform(-4, 4, count).astype(NP_DTYPES[code])
    info = np.iinfo(NP_DTYPES[code])
    return rng.integers(info.min, info.max, count, dtype=NP_DTYPES[code], endpoint=True)


@pytest.fixture(scope="module")
def ipc_worlds():
    """(ThreadWorld, FakeIpc, kernels) per (world size, several GPUs), made on first use: a
    world's groups keep the runtime they were made with."""
    made = {}

    def get(n, several):
        if (n, several) not in made:
            ids = {f"rank{q}": f"0000:{0x18 + q:02x}:00.0" for q in range(n)} if several \
                else {}
            made[(n, several)] = (ThreadWorld(n, timeout=30.0), FakeIpc(gpus=ids),
                                  CountingKernels())
        return made[(n, several)]
    yield get
    for w, _, _ in made.values():
        w.close()


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(n=st.sampled_from([2, 3, 4]), per=st.sampled_from([0, 1, 2, 7, 13, 1031]),
       code=st.sampled_from(list(NP_DTYPES)), op=st.sampled_from(OPS),
       several=st.booleans(), seed=st.integers(0, 2**16))
def test_ipc_equals_the_host_path(monkeypatch, ipc_worlds, n, per, code, op, several, seed):
    """Sizes 0 and primes (x n), every dtype and op, one GPU and several: all-reduce (in
    place and not), reduce-scatter, all-gather and all-to-all by IPC give the host path's
    bits."""
    if not dt.op_supported(code, op):
        return
    world, f, k = ipc_worlds(n, several)
    monkeypatch.setenv("TOPOCOMM_CUDA_PATH", "auto")
    monkeypatch.setattr(cuda_ipc, "_opened", f)
    monkeypatch.setattr(cuda, "_chosen", k)
    monkeypatch.setattr(device_copy, "_chosen", MemmoveEngine())
    count = n * per
    npd = NP_DTYPES[code]
    ins = [_random(r, count, code, seed) for r in range(n)]
    before = len(k.calls)

    def body(c):
        r, got = c.rank, []
        for device in (False, True):
            def buf(values):
                return HostDevice(values, npd) if device else np.array(values, npd)

            def host(b):
                return b.host if device else b
            x = buf(ins[r])
            c.allreduce(x, op=op)
            y, z = buf(ins[r]), buf(np.zeros(count))
            c.allreduce(y, op=op, out=z)
            s = buf(np.zeros(per))
            if op != dt.AVG:
                c.reduce_scatter(buf(ins[r]), s, op=op)
            g = buf(np.zeros(count * n))
            c.allgather(buf(ins[r]), g)
            a = buf(np.zeros(count))
            c.all_to_all(buf(ins[r]), a)
            got.append([host(v).copy() for v in (x, y, z, s, g, a)])
        return got
    for host_path, ipc_path in world.run(body):
        for h, s in zip(host_path, ipc_path):
            assert h.dtype == s.dtype and np.array_equal(h, s, equal_nan=h.dtype.kind == "f")
    assert count == 0 or any(c[1] == "reduce" for c in k.calls[before:])


def test_a_repeated_call_reuses_its_prepared_plan(fake, monkeypatch):
    f, k = fake()
    prepared = []
    real = ipc_algo.IpcGroup._prepare

    def counting(self, *a):
        prepared.append(threading.current_thread().name)
        return real(self, *a)
    monkeypatch.setattr(ipc_algo.IpcGroup, "_prepare", counting)
    with ThreadWorld(2, timeout=30) as w:
        def body(c):
            x, y = HostDevice(np.ones(4)), HostDevice(np.ones(4))
            for _ in range(3):
                c.allreduce(x)              # the same records: prepared once
            c.allreduce(y)                  # another buffer: prepared again
            f.generation = 1                # a mapping was closed: plans are dropped
            c.allreduce(y)
            return x.host.tolist(), y.host.tolist()
        res = w.run(body)
    assert res == [([8.0] * 4, [4.0] * 4)] * 2
    assert sorted(prepared) == ["rank0"] * 3 + ["rank1"] * 3


def test_under_mps_each_rank_queues_the_copies_into_its_own_buffer(fake, monkeypatch):
    """One GPU: without MPS the leader queues every copy of an all-gather; with every rank
    an MPS client, each rank queues its own (they run at once); the all-reduce stays one
    kernel on rank 0."""
    from topology.detect import gpu as gpu_detect
    for mps in (False, True):
        monkeypatch.setattr(gpu_detect, "mps_active", lambda mps=mps: mps)
        f, k = fake()
        with ThreadWorld(3, timeout=30) as w:
            def body(c):
                g = HostDevice(np.zeros(6))
                c.allgather(HostDevice(np.full(2, float(c.rank))), g)
                x = HostDevice(np.ones(2))
                c.allreduce(x)
                return g.host.tolist(), x.host.tolist(), c._memory_groups["cuda"].ipc.last
            res = w.run(body)
        assert all(r[:2] == ([0.0, 0.0, 1.0, 1.0, 2.0, 2.0], [3.0, 3.0]) for r in res)
        assert all(r[2] == ("one GPU, MPS" if mps else "one GPU") for r in res)
        copiers = sorted({name for name, what, *_ in k.calls if what == "copy"})
        assert copiers == (["rank0", "rank1", "rank2"] if mps else ["rank0"])
        assert {name for name, what, *_ in k.calls if what == "reduce"} == {"rank0"}


def test_mps_is_seen_by_its_control_pipe(tmp_path):
    from topology.detect import gpu as gpu_detect
    pipe = tmp_path / "mps"
    assert not gpu_detect.mps_active({"CUDA_MPS_PIPE_DIRECTORY": str(pipe)})
    pipe.mkdir()
    (pipe / "control").touch()
    assert gpu_detect.mps_active({"CUDA_MPS_PIPE_DIRECTORY": str(pipe)})
