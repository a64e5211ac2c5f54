"""init_process_group("cpu:topocomm,<device>:<backend>"): torch hands the topocomm group the
tensors of every device; the group forwards the other device's tensors to the backend its
config names (comms/torch/delegate.py), made once, with the same arguments. Checked with the
meta device and a recording backend, as a CUDA tensor would go to NCCL."""
import datetime

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

import comms  # noqa: E402,F401 - registers topocomm
from comms.torch.delegate import Delegates  # noqa: E402

pytestmark = pytest.mark.timeout(60)


class Recording(dist.ProcessGroup):
    """A backend plugin that records what reaches it and completes at once."""
    made = []

    def __init__(self, store, rank, size, timeout):
        super().__init__(rank, size)
        self.calls, self.opts, self.stopped = [], [], False
        store.set("recording/made", b"1")            # the store it got works
        Recording.made.append(self)

    def _done(self, name, tensors, opts=None):
        self.calls.append(name)
        self.opts.append(type(opts).__name__)
        fut = torch.futures.Future()
        fut.set_result(tensors)
        return torch._C._distributed_c10d._create_work_from_future(fut)

    def allreduce(self, tensors, opts=None):
        return self._done("allreduce", tensors, opts)

    def broadcast(self, tensors, opts=None):
        return self._done("broadcast", tensors, opts)

    def _allgather_base(self, output, input, opts=None):
        return self._done("_allgather_base", [output], opts)

    def _reduce_scatter_base(self, output, input, opts=None):
        return self._done("_reduce_scatter_base", [output], opts)

    def alltoall_base(self, output, input, out_splits, in_splits, opts=None):
        return self._done("alltoall_base", [output], opts)

    def shutdown(self):
        self.stopped = True


if "RECORDING" not in dist.Backend._plugins:
    dist.Backend.register_backend(
        "recording", lambda store, rank, size, timeout: Recording(store, rank, size, timeout),
        devices=["meta"])


@pytest.fixture
def world():
    Recording.made = []

    def make(config):
        dist.init_process_group(config, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=30))
        return dist.group.WORLD
    yield make
    if dist.is_initialized():
        dist.destroy_process_group()


def test_tensors_of_a_delegated_device_go_to_its_backend(world):
    world("cpu:topocomm,meta:recording")
    m = torch.empty(4, device="meta")
    dist.all_reduce(m)
    dist.broadcast(m, src=0)
    dist.all_gather_single(torch.empty(4, device="meta"), m)
    dist.reduce_scatter_single(torch.empty(4, device="meta"), m)
    dist.all_to_all_single(torch.empty(4, device="meta"), m)
    x = torch.arange(4.0)                              # CPU tensors stay with topocomm
    dist.all_reduce(x)
    dist.all_to_all_single(x, x)
    assert x.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert len(Recording.made) == 1                    # made once, on first use
    assert Recording.made[0].calls == ["allreduce", "broadcast", "_allgather_base",
                                       "_reduce_scatter_base", "alltoall_base"]
    dist.destroy_process_group()
    assert Recording.made[0].stopped                   # shut down with the group


def test_coalesced_calls_and_missing_options_are_forwarded(world):
    """c10d backends have no coalesced single-tensor calls (one call per pair, one Work for
    all) and refuse opts=None (the default options are passed)."""
    pg = world("cpu:topocomm,meta:recording")
    m = [torch.empty(4, device="meta") for _ in range(4)]
    work = pg.all_gather_single_coalesced(m[:2], m[2:], None)
    work.wait()
    pg.reduce_scatter_single_coalesced(m[:2], m[2:]).wait()
    pg.allreduce([m[0]])
    rec = Recording.made[0]
    assert rec.calls == ["_allgather_base"] * 2 + ["_reduce_scatter_base"] * 2 + ["allreduce"]
    assert rec.opts == ["AllgatherOptions"] * 2 + ["ReduceScatterOptions"] * 2 + [
        "AllreduceOptions"]


def test_without_a_backend_for_the_device_topocomm_refuses_it_by_name(world):
    world("cpu:topocomm")
    with pytest.raises(ValueError, match="tensors: tensor is on meta"):
        dist.all_reduce(torch.empty(2, device="meta"))
    assert Recording.made == []


def test_gloo_is_made_with_the_arguments_torch_gives_it():
    store = dist.HashStore()
    d = Delegates(None, store, 0, 1, datetime.timedelta(seconds=30))
    d.names = {"cpu": "gloo"}                         # as a config "cpu:gloo" would say
    gloo = d.backend_for("cpu")
    assert d.backend_for("cpu") is gloo and isinstance(gloo, dist.ProcessGroupGloo)
    t = torch.ones(3)
    gloo.allreduce([t]).wait()
    assert t.tolist() == [1.0, 1.0, 1.0]
    assert d.backend_for("meta") is None              # not named: topocomm's
    d.close()
