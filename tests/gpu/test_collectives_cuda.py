"""CUDA tensors in every collective, 2 and 4 ranks on one GPU, by both device paths: CUDA IPC
(comms/algorithms/device/ipc.py, TOPOCOMM_CUDA_PATH=auto) and staged through pinned host
memory (comms/algorithms/device/staged.py, TOPOCOMM_CUDA_PATH=staged): through the
Communicator and through torch.distributed, against the same collective on CPU tensors and
on gloo; stream order."""
import textwrap

import pytest

from comms.testing import run_procs

pytestmark = pytest.mark.timeout(300)

COMMON = textwrap.dedent("""
    import os, sys, numpy as np, torch
    import comms
    rank, n = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(0)
    DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int32,
              torch.int64, torch.int8, torch.uint8]

    def inputs(count, dtype, salt=0, of=None):     # rank `of`'s inputs (default: mine)
        g = torch.Generator().manual_seed(1000 * (rank if of is None else of) + count + salt)
        return torch.randint(0, 5, (count,), generator=g).to(dtype)
""")

# every collective through the Communicator: CUDA result == CPU result, bit for bit
COMMUNICATOR = COMMON + textwrap.dedent("""
    c = comms.init(timeout=120)
    bad = []
    for dtype in DTYPES:
        for count in (0, 1, 7 * n, 4099 * n, (1 << 18) * n + 8 * n):
            for op in (["sum", "max", "min"] if dtype != torch.bool else ["max"]):
                x = inputs(count, dtype)
                want, got = x.clone(), x.cuda()
                c.allreduce(want, op=op); c.allreduce(got, op=op)
                if not torch.equal(want, got.cpu()):
                    bad.append(("allreduce", dtype, count, op))
            x = inputs(count, dtype)
            for name, run in [
                ("broadcast", lambda b: c.broadcast(b, root=n - 1)),
                ("reduce", lambda b: c.reduce(b, root=1)),
            ]:
                want, got = x.clone(), x.cuda()
                run(want); run(got)
                if not torch.equal(want, got.cpu()):
                    bad.append((name, dtype, count))
            want, got = torch.zeros(count * n, dtype=dtype), torch.zeros(count * n, dtype=dtype,
                                                                      device="cuda")
            c.allgather(x, want); c.allgather(x.cuda(), got)
            if not torch.equal(want, got.cpu()):
                bad.append(("allgather", dtype, count))
            if count % n == 0:
                want = torch.zeros(count, dtype=dtype)
                got = torch.zeros(count, dtype=dtype, device="cuda")
                c.all_to_all(x, want); c.all_to_all(x.cuda(), got)
                if not torch.equal(want, got.cpu()):
                    bad.append(("all_to_all", dtype, count))
            if count % n == 0:
                want = torch.zeros(count // n, dtype=dtype)
                got = torch.zeros(count // n, dtype=dtype, device="cuda")
                c.reduce_scatter(x, want); c.reduce_scatter(x.cuda(), got)
                if not torch.equal(want, got.cpu()):
                    bad.append(("reduce_scatter", dtype, count))
    x = torch.ones(4, device="cuda")
    x.add_(1)                                   # queued before the collective
    c.all_to_all(x, x)                          # in place: a scratch copy first
    c.allreduce(x, op="avg")
    if x.tolist() != [2.0] * 4:
        bad.append(("in place a2a + avg", x.tolist()))
    path = c._memory_groups["cuda"].path()
    want = "staged" if os.environ.get("TOPOCOMM_CUDA_PATH") == "staged" else "ipc"
    if path != want:
        bad.append(("path", path, want, c._memory_groups["cuda"].ipc and
                    c._memory_groups["cuda"].ipc.off))
    c.close()
    print("BAD", bad) if bad else print("OK")
""")

# torch.distributed with backend "topocomm" on CUDA tensors, against gloo on the same data
TORCH = COMMON + textwrap.dedent("""
    import torch.distributed as dist
    import comms.torch  # noqa: F401 - registers the backend
    dist.init_process_group("topocomm", timeout=__import__("datetime").timedelta(seconds=120))
    gloo = dist.new_group(backend="gloo")
    bad = []
    for dtype in (torch.float32, torch.bfloat16, torch.int64):
        for count in (n, 8 * n, 300007 * n):        # dim 0 splits over the ranks
            x = inputs(count, dtype)
            a, b = x.cuda(), x.cuda()
            dist.all_reduce(a); dist.all_reduce(b, group=gloo)
            if not torch.equal(a, b):
                bad.append(("all_reduce", dtype, count))
            a, b = torch.empty_like(x).cuda(), torch.empty_like(x).cuda()
            dist.all_to_all_single(a, x.cuda()); dist.all_to_all_single(b, x.cuda(), group=gloo)
            if not torch.equal(a, b):
                bad.append(("all_to_all_single", dtype, count))
            a = torch.empty(count * n, dtype=dtype, device="cuda")
            b = torch.empty(count * n, dtype=dtype, device="cuda")
            dist.all_gather_into_tensor(a, x.cuda()); dist.all_gather_into_tensor(b, x.cuda(),
                                                                                  group=gloo)
            if not torch.equal(a, b):
                bad.append(("all_gather_into_tensor", dtype, count))
            a, b = x.cuda(), x.cuda()
            dist.broadcast(a, src=1); dist.broadcast(b, src=1, group=gloo)
            if not torch.equal(a, b):
                bad.append(("broadcast", dtype, count))
    x = inputs(5, torch.float32).cuda()
    outs = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(outs, x)
    want = [torch.empty_like(x.cpu()) for _ in range(n)]
    dist.all_gather(want, x.cpu(), group=gloo)
    if not all(torch.equal(a.cpu(), b) for a, b in zip(outs, want)):
        bad.append(("all_gather list",))
    ins = [inputs(3, torch.float32, salt=q).cuda() for q in range(n)]
    outs = [torch.empty(3, device="cuda") for _ in range(n)]
    dist.all_to_all(outs, ins)
    # gloo's list-form all_to_all is newer than some torch releases: the values directly
    want = [inputs(3, torch.float32, salt=rank, of=p) for p in range(n)]
    if not all(torch.equal(a.cpu(), b) for a, b in zip(outs, want)):
        bad.append(("all_to_all list",))
    # stream order: the collective runs after the work queued on the caller's current
    # stream, and its result is there for the work queued after it, sync and async
    s = torch.cuda.Stream()
    for async_op in (False, True):
        with torch.cuda.stream(s):
            x = torch.ones(1 << 22, device="cuda")
            torch.cuda._sleep(50_000_000)          # ~ tens of ms of GPU time on s
            x.mul_(rank + 1)
            w = dist.all_reduce(x, async_op=async_op)
            if async_op:
                w.wait()
            y = x * 1
        torch.cuda.synchronize()
        if not torch.equal(y, torch.full_like(y, n * (n + 1) / 2)):
            bad.append(("stream order", async_op, float(y[0])))
    # wait() on another stream: that stream waits for the collective (no CPU wait)
    s2 = torch.cuda.Stream()
    with torch.cuda.stream(s):
        x = torch.ones(1 << 22, device="cuda")
        torch.cuda._sleep(50_000_000)
        x.mul_(rank + 1)
        w = dist.all_reduce(x, async_op=True)
    with torch.cuda.stream(s2):
        w.wait()
        y = x * 1
    torch.cuda.synchronize()
    if not torch.equal(y, torch.full_like(y, n * (n + 1) / 2)):
        bad.append(("wait on another stream", float(y[0])))
    # large async work queued behind each other on the progress thread keeps stream order
    with torch.cuda.stream(s):
        xs = [torch.full((1 << 20,), float(i + rank), device="cuda") for i in range(4)]
        works = [dist.all_reduce(t, async_op=True) for t in xs]
        for w in works:
            w.wait()
        ok = all(torch.equal(t, torch.full_like(t, float(n * i + n * (n - 1) / 2)))
                 for i, t in enumerate(xs))
    torch.cuda.synchronize()
    if not ok:
        bad.append(("queued async order",))
    dist.destroy_process_group()
    print("BAD", bad) if bad else print("OK")
""")

# a DDP step on CUDA through topocomm equals the same step through gloo
DDP = COMMON + textwrap.dedent("""
    import torch.distributed as dist
    import comms.torch  # noqa: F401
    from torch.nn.parallel import DistributedDataParallel as DDP
    dist.init_process_group("topocomm")
    gloo = dist.new_group(backend="gloo")
    outs = []
    for pg in (None, gloo):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                                    torch.nn.Linear(256, 8)).cuda()
        ddp = DDP(model, process_group=pg, bucket_cap_mb=1)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(rank)
        for _ in range(3):
            x = torch.randn(32, 64, generator=g).cuda()
            opt.zero_grad()
            ddp(x).square().mean().backward()
            opt.step()
        outs.append(torch.cat([p.detach().flatten() for p in model.parameters()]).cpu())
    dist.destroy_process_group()
    print("OK" if torch.equal(outs[0], outs[1]) else f"BAD {(outs[0] - outs[1]).abs().max()}")
""")


def _all_ok(res):
    for r, (rc, so, se) in enumerate(res):
        assert rc == 0 and so.strip().endswith("OK"), (r, rc, so[-2000:], se[-4000:])


PATHS = ["auto", "staged"]

# the IPC path with the torch fold as the kernels (what runs where cupy is missing)
TORCH_KERNELS = textwrap.dedent("""
    import torch
    from comms.kernels import cuda as _k
    _k._chosen = _k.TorchKernels(torch)
""")


def test_ipc_with_the_torch_kernels_equals_the_cpu_path_auto():
    _all_ok(run_procs(2, TORCH_KERNELS + COMMUNICATOR, timeout=280,
                      env={"TOPOCOMM_CUDA_PATH": "auto"}))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("n", [2, 4])
def test_every_collective_on_cuda_equals_the_cpu_path(n, path):
    _all_ok(run_procs(n, COMMUNICATOR, timeout=280, env={"TOPOCOMM_CUDA_PATH": path}))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("n", [2, 4])
def test_torch_distributed_on_cuda_equals_gloo_and_keeps_stream_order(n, path):
    _all_ok(run_procs(n, TORCH, timeout=280, env={"TOPOCOMM_CUDA_PATH": path}))


@pytest.mark.parametrize("path", PATHS)
def test_ddp_step_on_cuda_equals_gloo(path):
    _all_ok(run_procs(2, DDP, timeout=280, env={"TOPOCOMM_CUDA_PATH": path}))


def test_copy_engines_round_trip_with_offsets():
    import numpy as np
    import torch

    from comms.api.buffers import as_buf
    from comms.kernels import device_copy
    engines = [device_copy.TorchEngine(torch)]
    try:
        import cupy
        engines.append(device_copy.CupyEngine(cupy))
    except ImportError:
        pass
    for eng in engines:
        src = torch.arange(1000, dtype=torch.int32, device="cuda")
        buf = as_buf(src, "src")
        host = eng.host_array(400)
        eng.to_host(host, buf, offset=40)
        assert np.array_equal(host.view(np.int32), np.arange(10, 110)), eng.name
        host[:] = 0
        eng.to_device(buf, host, offset=400)
        assert int(src[100:200].abs().sum()) == 0 and int(src[200]) == 200, eng.name
        # the pieced copies: queued on the stream, done at wait()
        pinned = eng.host_array(400)
        eng.wait(eng.to_host_async(pinned, buf, offset=800))
        assert np.array_equal(pinned.view(np.int32), np.arange(200, 300)), eng.name
        pinned[:] = 1
        eng.wait(eng.to_device_async(buf, pinned, offset=0))
        assert int(src[0]) == int(src[99]) == 0x01010101 and int(src[100]) == 0, eng.name


NCCL_DELEGATE = textwrap.dedent("""
    import torch, torch.distributed as dist
    import comms.torch  # noqa: F401
    from comms.torch.backend import communicator_of
    torch.cuda.set_device(0)
    dist.init_process_group("cpu:topocomm,cuda:nccl")
    g = torch.ones(8, device="cuda")
    dist.all_reduce(g)
    c = torch.ones(8)
    dist.all_reduce(c)
    pg = communicator_of(None)[1]
    made = {k: type(v).__name__ for k, v in pg._delegates.made.items()}
    torch.cuda.synchronize()
    dist.destroy_process_group()
    ok = made == {"cuda": "ProcessGroupNCCL"} and g.tolist() == c.tolist() == [1.0] * 8
    print("OK" if ok else f"BAD {made} {g.tolist()} {c.tolist()}")
""")


def test_cpu_topocomm_cuda_nccl_sends_cuda_tensors_to_nccl():
    """NCCL takes one rank per GPU: one rank here."""
    _all_ok(run_procs(1, NCCL_DELEGATE, timeout=200))
