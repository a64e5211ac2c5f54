"""The torch seam (comms/torch/backend.py) in one process: a recording stub Communicator for the
mechanics (op mapping, inline vs progress thread, order, errors, shutdown), and the real
Communicator at world size 1 through the torch API."""
from __future__ import annotations

import datetime
import threading
import warnings

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import comms  # noqa: E402  (registers the backend)
from comms.torch import backend  # noqa: E402

pytestmark = pytest.mark.timeout(60)
R = dist.ReduceOp


class StubCommunicator:
    """Records calls; allreduce adds 1 in place; `gate` (an Event) holds large operations."""

    instances: list = []

    def __init__(self, rank, size, store, timeout=300.0, name="world"):
        self.rank, self.size, self.store, self.timeout, self.name = rank, size, store, timeout, name
        self.calls = []
        self.gate = None
        self.fail = None
        self.closed = False
        StubCommunicator.instances.append(self)

    def _record(self, what, *args):
        self.calls.append((what, threading.current_thread().name) + args)
        if self.gate is not None and what != "barrier":
            assert self.gate.wait(10)
        if self.fail is not None:
            raise self.fail

    def allreduce(self, buf, op="sum", out=None):
        self._record("allreduce", op, buf.numel())
        buf.add_(1)
        return buf

    def broadcast(self, buf, root=0):
        self._record("broadcast", root)

    def reduce(self, buf, root=0, op="sum", out=None):
        self._record("reduce", root, op)

    def allgather(self, send, recv):
        self._record("allgather", send.numel(), recv.numel())
        recv.reshape(-1).copy_(send.reshape(-1).repeat(self.size))

    def reduce_scatter(self, send, recv, op="sum"):
        self._record("reduce_scatter", op, send.numel(), recv.numel())

    def all_to_all(self, send, recv, send_counts=None, recv_counts=None):
        self._record("all_to_all", send_counts, recv_counts)

    def all_to_all_known(self, send, recv, send_addr, recv_addr):
        return None   # nothing seen before: the seam takes all_to_all

    def gather(self, send, recv, root=0):
        self._record("gather", root)

    def scatter(self, send, recv, root=0):
        self._record("scatter", root)

    def barrier(self):
        self._record("barrier")

    def send(self, buf, dst, tag=0):
        self._record("send", dst, tag)

    def recv(self, buf, src, tag=0):
        self._record("recv", src, tag)

    def close(self):
        self.closed = True


def _progress_threads():
    return [t for t in threading.enumerate() if t.name.startswith("topocomm-progress")]


@pytest.fixture
def stub_world(monkeypatch):
    """Default group "topocomm" of size 1 over the stub; destroyed afterwards."""
    StubCommunicator.instances.clear()
    monkeypatch.setattr(comms, "Communicator", StubCommunicator)
    dist.init_process_group("topocomm", store=dist.HashStore(), rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=42))
    pg = dist.group.WORLD
    try:
        yield pg, pg.communicator
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _stub_group(size, rank=0):
    """A ProcessGroupTopocomm of any size over the stub, without torch's registry."""
    comm = StubCommunicator(rank, size, None)
    return backend.ProcessGroupTopocomm(comm, rank, size, name=f"stub{size}"), comm


def test_register_is_idempotent_and_serves_cpu_and_cuda():
    assert backend.register() is True
    assert backend.register() is True
    assert "topocomm" in dist.Backend.backend_list
    assert dist.Backend._plugins["TOPOCOMM"].extended_api is True
    # registering must not take the cpu default away from gloo
    assert dist.Backend.default_device_backend_map.get("cpu") == "gloo"
    assert dist.Backend.backend_capability["topocomm"] == ["cpu", "cuda"]
    assert dist.Backend.default_device_backend_map.get("cuda") in ("nccl", None)


def test_creator_passes_rank_size_timeout_name(stub_world):
    pg, comm = stub_world
    assert isinstance(pg, backend.ProcessGroupTopocomm)
    assert (comm.rank, comm.size, comm.timeout) == (0, 1, 42.0)
    assert comm.name == pg.group_name
    assert pg.getBackendName() == "topocomm" and dist.get_backend(pg) == "topocomm"
    sub = dist.new_group(backend="topocomm")
    assert sub.group_name != pg.group_name
    assert sub.communicator.name == sub.group_name
    assert sub.communicator is not comm


@pytest.mark.parametrize("op, name", [(R.SUM, "sum"), (R.AVG, "avg"), (R.PRODUCT, "prod"),
                                      (R.MIN, "min"), (R.MAX, "max"), (R.BAND, "band"),
                                      (R.BOR, "bor"), (R.BXOR, "bxor")])
def test_reduce_ops_map_to_communicator_names(stub_world, op, name):
    pg, comm = stub_world
    t = torch.zeros(3, dtype=torch.int64)
    dist.all_reduce(t, op=op)
    dist.reduce(t, 0, op=op)
    assert comm.calls[0][2] == name and comm.calls[1][3] == name


def test_premul_sum_is_a_clear_error(stub_world):
    pg, comm = stub_world
    with pytest.raises(ValueError, match="PREMUL_SUM"):
        dist.all_reduce(torch.ones(2), op=dist._make_nccl_premul_sum(2.0))
    assert comm.calls == []


def test_small_blocking_ops_run_inline(stub_world):
    pg, comm = stub_world
    t = torch.zeros(2)
    dist.all_reduce(t)
    work = dist.all_reduce(t, async_op=True)
    assert work.is_completed() and work.wait()
    assert [c[1] for c in comm.calls] == [threading.current_thread().name] * 2
    assert t.tolist() == [2.0, 2.0]
    assert work.get_future().value()[0] is t
    big = torch.zeros(backend.INLINE_MAX_BYTES)  # blocking: inline whatever the size
    dist.all_reduce(big)
    assert comm.calls[-1][1] == threading.current_thread().name
    assert not _progress_threads()  # nothing started a thread yet


def test_large_async_ops_queue_and_keep_order(stub_world):
    pg, comm = stub_world
    comm.gate = threading.Event()
    big = torch.zeros(backend.INLINE_MAX_BYTES // 4)  # exactly the limit: queued
    w_big = dist.all_reduce(big, async_op=True)
    assert not w_big.is_completed()
    small = torch.zeros(1)
    w_small = dist.all_reduce(small, async_op=True)  # must wait behind the big one
    fut = w_small.get_future()
    assert not w_small.is_completed() and not fut.done()
    comm.gate.set()
    assert w_small.wait()
    assert w_big.is_completed() and fut.value()[0] is small
    assert [c[2:] for c in comm.calls] == [("sum", big.numel()), ("sum", 1)]
    assert {c[1] for c in comm.calls} == {f"topocomm-progress-{pg.group_name}"}
    assert big[0].item() == 1.0 and small.item() == 1.0
    dist.all_reduce(small)  # idle again: inline
    assert comm.calls[-1][1] == threading.current_thread().name


def test_errors_reach_wait_future_and_caller(stub_world):
    pg, comm = stub_world
    comm.fail = comms.CommError("peer 3 died")
    with pytest.raises(comms.CommError, match="peer 3"):
        dist.all_reduce(torch.zeros(1))  # inline: raised at the call
    work = dist.all_reduce(torch.zeros(backend.INLINE_MAX_BYTES), async_op=True)
    with pytest.raises(comms.CommError, match="peer 3"):
        work.wait()
    assert work.is_completed() and not work.is_success()
    assert isinstance(work.exception(), comms.CommError)
    with pytest.raises(Exception, match="peer 3"):
        work.get_future().wait()


def test_callback_may_block_on_a_new_operation(stub_world):
    """PowerSGD-style: a future callback (on the progress thread) issues an operation and
    waits for it; the queue runs it in order instead of deadlocking."""
    pg, comm = stub_world
    big = torch.zeros(backend.INLINE_MAX_BYTES)
    later = torch.zeros(backend.INLINE_MAX_BYTES)
    inner = torch.zeros(1)
    comm.gate = threading.Event()

    def callback(fut):
        return dist.all_reduce(inner, op=R.MAX, async_op=True).get_future().wait()[0]

    chained = dist.all_reduce(big, async_op=True).get_future().then(callback)
    dist.all_reduce(later, op=R.MIN, async_op=True)  # issued before the callback's op
    comm.gate.set()
    assert chained.wait() is inner
    dist.barrier()
    assert [c[2] for c in comm.calls if c[0] == "allreduce"] == ["sum", "min", "max"]

def test_wait_timeout(stub_world):
    pg, comm = stub_world
    comm.gate = threading.Event()
    work = dist.all_reduce(torch.zeros(backend.INLINE_MAX_BYTES), async_op=True)
    with pytest.raises(RuntimeError, match="did not finish"):
        work.wait(datetime.timedelta(milliseconds=50))
    comm.gate.set()
    assert work.wait()


def test_non_contiguous_tensors_are_written_back(stub_world):
    pg, comm = stub_world
    base = torch.zeros(4, 6)
    view = base.t()
    dist.all_reduce(view)
    assert torch.equal(base, torch.ones(4, 6))
    col = base[:, 1]
    dist.all_reduce(col, async_op=True).wait()
    assert base[:, 1].tolist() == [2.0] * 4 and base[:, 0].tolist() == [1.0] * 4


def test_destroy_stops_thread_and_closes(stub_world):
    pg, comm = stub_world
    comm.gate = threading.Event()
    work = dist.all_reduce(torch.zeros(backend.INLINE_MAX_BYTES), async_op=True)
    assert _progress_threads()
    threading.Timer(0.1, comm.gate.set).start()
    dist.destroy_process_group()  # finishes queued work first
    assert work.is_completed() and work.is_success()
    assert comm.closed and not _progress_threads()
    with pytest.raises(RuntimeError, match="shut down"):
        pg.allreduce([torch.zeros(1)])


def test_split_sizes_become_element_counts():
    pg, comm = _stub_group(3)
    out, inp = torch.empty(4, 2), torch.empty(5, 2)
    pg.all_to_all_single(out, inp, [1, 0, 3], [2, 0, 3]).wait()
    assert comm.calls[-1][2:] == ([4, 0, 6], [2, 0, 6])
    pg.all_to_all_single(torch.empty(6, 3), torch.empty(6, 3), [], []).wait()
    assert comm.calls[-1][2:] == (None, None)  # even split: the Communicator decides
    with pytest.raises(ValueError, match="input_split_sizes"):
        pg.all_to_all_single(out, inp, [1, 0, 3], [2, 2, 2])
    with pytest.raises(ValueError, match="not divisible"):
        pg.all_to_all_single(torch.empty(4), torch.empty(4), [], [])
    pg.all_to_all_single(torch.empty(0, 5), torch.empty(0, 5), [0, 0, 0], [0, 0, 0]).wait()
    assert comm.calls[-1][2:] == ([0, 0, 0], [0, 0, 0])


def test_argument_errors_name_the_argument():
    pg, comm = _stub_group(2)
    with pytest.raises(ValueError, match="output"):
        pg.all_gather_single(torch.empty(3), torch.empty(2))
    with pytest.raises(TypeError, match="dtype"):
        pg.all_gather_single(torch.empty(4, dtype=torch.int64), torch.empty(2))
    with pytest.raises(ValueError, match="output_tensors"):
        pg.allgather([[torch.empty(2)]], [torch.empty(2)])
    with pytest.raises(ValueError, match="tensors"):
        pg.allreduce([torch.empty(1), torch.empty(1)])
    if torch.device("meta").type not in backend.DEVICES:
        with pytest.raises(ValueError, match="meta"):
            pg.allreduce([torch.empty(1, device="meta")])
    assert comm.calls == []


def test_every_spelling_is_defined():
    names = ["allreduce", "allreduce_coalesced", "broadcast", "reduce", "allgather",
             "allgather_coalesced", "_allgather_base", "all_gather_single",
             "all_gather_into_tensor", "allgather_into_tensor_coalesced",
             "all_gather_single_coalesced", "reduce_scatter", "_reduce_scatter_base",
             "reduce_scatter_single", "reduce_scatter_tensor", "reduce_scatter_tensor_coalesced",
             "reduce_scatter_single_coalesced", "alltoall", "alltoall_base",
             "all_to_all_single", "gather", "scatter", "barrier", "send", "recv",
             "recv_anysource", "getBackendName", "shutdown", "abort"]
    cls = backend.ProcessGroupTopocomm
    assert [n for n in names if n not in cls.__dict__] == []


# ---- the real Communicator, world size 1 ------------------------------------------------
@pytest.fixture
def real_world():
    warnings.simplefilter("ignore", FutureWarning)
    dist.init_process_group("topocomm", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()
    assert not _progress_threads()


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.bfloat16])
def test_world_of_one_through_torch(real_world, dtype):
    x = (torch.arange(12) % 5 + 1).to(dtype)
    for op in (R.SUM, R.PRODUCT, R.MIN, R.MAX):
        t = x.clone()
        dist.all_reduce(t, op=op)
        assert torch.equal(t, x)
    t = x.clone()
    dist.broadcast(t, 0)
    dist.reduce(t, 0)
    assert torch.equal(t, x)
    out = torch.empty_like(x)
    dist.all_gather_into_tensor(out, x)
    assert torch.equal(out, x)
    lst = [torch.empty_like(x)]
    dist.all_gather(lst, x)
    assert torch.equal(lst[0], x)
    dist.reduce_scatter_tensor(out, x)
    assert torch.equal(out, x)
    dist.all_to_all_single(out, x)
    assert torch.equal(out, x)
    dist.all_to_all_single(out, x, [12], [12])
    assert torch.equal(out, x)
    g = [torch.empty_like(x)]
    dist.gather(x, g, dst=0)
    assert torch.equal(g[0], x)
    dist.scatter(out, [x], src=0)
    assert torch.equal(out, x)
    dist.barrier()
    big = torch.ones(1 << 17, dtype=dtype)
    works = [dist.all_reduce(big, async_op=True), dist.all_reduce(t, async_op=True)]
    for w in works:
        w.wait()
    assert torch.equal(big, torch.ones(1 << 17, dtype=dtype))


def test_world_of_one_ddp(real_world):
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = nn.Linear(8, 2)
    ref = nn.Linear(8, 2)
    ref.load_state_dict(model.state_dict())
    ddp = DDP(model)
    x = torch.randn(4, 8)
    ddp(x).sum().backward()
    ref(x).sum().backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(p.grad, q.grad)



@pytest.mark.parametrize("n", [2, 3])
def test_even_all_to_all_single_hot_path_on_real_groups(n):
    """Repeated even all_to_all_single calls take the one-C-call path from the second call
    on (the Communicator's table of checked sizes); results stay right, including in place
    (paired rounds in that path on 2 ranks, the copy-aside path on 3) and an async call."""
    from comms.testing import ThreadWorld
    rows = 6
    opts = dist.AllToAllOptions()
    opts.asyncOp = False
    with ThreadWorld(n) as w:
        def body(comm):
            pg = backend.ProcessGroupTopocomm(comm, comm.rank, n, name="hot")
            try:
                r, got = comm.rank, []
                for call in range(6):
                    inp = torch.arange(rows * 5, dtype=torch.float32).reshape(rows, 5) \
                        + 100 * r + 1000 * call
                    out = torch.full_like(inp, -1)
                    if call in (2, 4, 5):
                        pg.all_to_all_single(inp, inp, [], [], opts)      # in place
                        out = inp
                    elif call == 3:
                        pg.all_to_all_single(out, inp, [], []).wait()     # async
                    else:
                        pg.all_to_all_single(out, inp, [], [], opts)
                    got.append(out.clone())
                return got, comm.group.all_to_all_hit(torch.Tensor, torch.float32,
                                                      rows * 5 * 4) is not None
            finally:
                pg.shutdown()
        for r, (got, hits) in enumerate(w.run(body)):
            assert hits               # the size was checked once and served later calls
            base = torch.arange(rows * 5, dtype=torch.float32).reshape(rows, 5)
            per = rows // n
            for call, out in enumerate(got):
                exp = torch.cat([base[r * per:(r + 1) * per] + 100 * p + 1000 * call
                                 for p in range(n)])
                assert torch.equal(out, exp), (r, call)


@pytest.mark.parametrize("second", ["broadcast", "allreduce", "all_gather_single",
                                    "reduce_scatter_single", "all_to_all_single"])
def test_non_contiguous_op_after_queued_work_sees_its_result(second):
    """A non-contiguous tensor is made dense when its operation runs, not when it is issued:
    issued behind a queued all-reduce of the same memory, it sees the all-reduce's result
    (and does not write stale data back over it)."""
    from comms.testing import ThreadWorld
    n = 2
    with ThreadWorld(n) as w:
        def body(comm):
            pg = backend.ProcessGroupTopocomm(comm, comm.rank, n, name="order")
            try:
                x = torch.full((512, 512), float(comm.rank + 1))   # 1 MiB: queued when async
                o = dist.AllreduceOptions()
                o.asyncOp = True
                first = pg.allreduce([x], o)                        # x -> 3 on both ranks
                xt = x.t()
                assert not xt.is_contiguous()
                if second == "broadcast":
                    b = dist.BroadcastOptions()
                    b.rootRank = 1
                    pg.broadcast([xt], b).wait()                    # 3 from rank 1
                    want = torch.full((512, 512), 3.0)
                elif second == "allreduce":
                    pg.allreduce([xt]).wait()                       # 3 + 3
                    want = torch.full((512, 512), 6.0)
                elif second == "all_gather_single":
                    out = torch.empty(n * 512, 512).t()             # non-contiguous output
                    pg.all_gather_single(out, xt).wait()
                    first.wait()
                    return torch.equal(out, torch.full((512, n * 512), 3.0))
                elif second == "reduce_scatter_single":
                    out = torch.empty(512, 256)
                    pg.reduce_scatter_single(out, xt).wait()        # 3 + 3 in each half
                    first.wait()
                    return torch.equal(out, torch.full((512, 256), 6.0))
                else:
                    out = torch.empty(512, 512).t()
                    pg.all_to_all_single(out, xt, [], []).wait()
                    first.wait()
                    return torch.equal(out, torch.full((512, 512), 3.0))
                first.wait()
                return torch.equal(x, want)
            finally:
                pg.shutdown()
        assert all(w.run(body))


@pytest.mark.parametrize("case", ["a2a_splits", "allgather_list", "reduce_scatter_list",
                                  "gather_root_list", "all_gather_into_tensor", "allreduce_op"])
def test_seam_argument_error_on_one_rank_raises_everywhere(case):
    """An argument the torch seam refuses on one rank only: that rank raises an error naming
    it, the others raise ArgumentMismatch at once (not at the timeout), and the group stays
    usable (found by review: the others timed out and the group broke)."""
    import time
    from comms.core.context import ArgumentMismatch
    from comms.testing import ThreadWorld
    n = 3
    with ThreadWorld(n, timeout=20.0) as w:
        def body(comm):
            pg = backend.ProcessGroupTopocomm(comm, comm.rank, n, name="bad")
            bad = comm.rank == 1
            t0 = time.monotonic()
            try:
                try:
                    if case == "a2a_splits":
                        pg.all_to_all_single(torch.empty(6), torch.ones(6),
                                             [2, 2, 2], [1, 1, 1] if bad else [2, 2, 2]).wait()
                    elif case == "allgather_list":
                        outs = [torch.empty(4) for _ in range(n)]
                        if bad:
                            outs[2] = torch.empty(5)
                        pg.allgather([outs], [torch.ones(4)]).wait()
                    elif case == "reduce_scatter_list":
                        ins = [torch.ones(4) for _ in range(n - 1 if bad else n)]
                        pg.reduce_scatter([torch.empty(4)], [ins]).wait()
                    elif case == "gather_root_list":
                        o = dist.GatherOptions()
                        o.rootRank = 1
                        outs = [[torch.empty(4) for _ in range(n + 1)]] if bad else []
                        pg.gather(outs, [torch.ones(4)], o).wait()
                    elif case == "all_gather_into_tensor":
                        out = torch.empty(n * 4 + (1 if bad else 0))
                        pg.all_gather_into_tensor(out, torch.ones(4)).wait()
                    else:
                        o = dist.AllreduceOptions()
                        o.reduceOp = dist.ReduceOp.SUM
                        if bad:
                            o.reduceOp = dist._make_nccl_premul_sum(2.0)
                        pg.allreduce([torch.ones(4)], o).wait()
                    err = None
                except Exception as e:
                    err = e
                took = time.monotonic() - t0
                x = torch.ones(3)
                pg.allreduce([x]).wait()
                return type(err), str(err), took, float(x[0])
            finally:
                pg.shutdown()
        for r, (kind, msg, took, total) in enumerate(w.run(body)):
            assert took < 10, (r, msg, took)
            if r == 1:
                assert kind in (ValueError, TypeError) or issubclass(kind, (ValueError, TypeError))
                assert not issubclass(kind, ArgumentMismatch), msg
            else:
                assert issubclass(kind, ArgumentMismatch), (r, kind, msg)
            assert total == n


def test_seam_errors_show_and_pickle_as_builtins():
    """The seam's argument errors are ValueError/TypeError subclasses (they route the
    rejection to the peers); users see, catch and pickle the builtins (found by review:
    multiprocessing could not send them back)."""
    import pickle
    from comms.torch import backend
    for cls, base in ((backend._BadValue, ValueError), (backend._BadType, TypeError)):
        err = cls("tensor: bad")
        assert isinstance(err, base) and type(err).__name__ == base.__name__
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is base and str(back) == "tensor: bad"
