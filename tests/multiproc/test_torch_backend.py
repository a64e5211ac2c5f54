"""torch.distributed through backend "topocomm", checked against gloo on real spawned ranks.

Spawning a world costs seconds on this machine, so each world size runs once (a module fixture)
and executes every check inside the same processes; each check is then reported by its own
test. Every rank runs a gloo group and a topocomm group side by side and feeds both the same
inputs; results must be equal (values are small integers, exact in every dtype and in any
summation order) except AVG, compared with gloo's SUM / n. World 2 uses topocomm as the default
group and gloo as a subgroup; world 4 the other way round.

Nothing can hang: the parent kills the world after WORLD_TIMEOUT_S and the checks that did not
report fail. Inside a check, mismatches are collected rather than raised, so one rank never
skips a collective that its peers run.
"""
from __future__ import annotations

import datetime
import os
import queue
import sys
import threading
import time
import traceback
import warnings

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

WORLD_SIZES = (2, 4)
WORLD_TIMEOUT_S = 120
STORE_TIMEOUT = datetime.timedelta(seconds=60)
DTYPES = (torch.float32, torch.int64, torch.bfloat16)
SIZES = (1, 13, 70001)  # 70001 x 4 or 8 bytes: above the inline limit, so the progress thread
R = dist.ReduceOp
INT_ONLY_OPS = (R.BAND, R.BOR, R.BXOR)
GLOO_OPS = (R.SUM, R.PRODUCT, R.MIN, R.MAX) + INT_ONLY_OPS


# ---------------------------------------------------------------------------- rank side
class Ctx:
    def __init__(self, rank, world_size, topo, gloo):
        self.rank, self.ws, self.topo, self.gloo = rank, world_size, topo, gloo
        self.errors = []

    def expect(self, ok, what):
        if not ok:
            self.errors.append(what)

    def equal(self, got, want, what):
        if isinstance(got, (list, tuple)):
            self.expect(len(got) == len(want), f"{what}: {len(got)} tensors, want {len(want)}")
            for i, (g, w) in enumerate(zip(got, want)):
                self.equal(g, w, f"{what}[{i}]")
            return
        if got.dtype != want.dtype or got.shape != want.shape or not torch.equal(got, want):
            self.errors.append(f"{what}: got {_short(got)}, want {_short(want)}")

    def close(self, got, want, what, rtol, atol):
        if got.shape != want.shape or not torch.allclose(got.double(), want.double(), rtol, atol):
            self.errors.append(f"{what}: got {_short(got)}, want {_short(want)}")


def _short(t):
    flat = t.reshape(-1)
    return f"{t.dtype} {tuple(t.shape)} {flat[:6].tolist()}{'...' if flat.numel() > 6 else ''}"


def values(n, dtype, rank, salt=0, kind="small"):
    """Inputs unique per (rank, index), exact in every dtype and summation order."""
    i = torch.arange(n, dtype=torch.int64)
    if kind == "prod":      # products of <= 4 values in {1, 2, -1} stay exact
        return torch.tensor([1, 2, -1])[(i + rank + salt) % 3].to(dtype)
    if kind == "bits":
        return ((i * 2654435761 + rank * 977 + salt * 31) % (1 << 40)).to(dtype)
    return ((i * 7 + rank * 13 + salt * 5) % 11 - 5).to(dtype)


def _ops_for(dtype):
    ops = [R.SUM, R.PRODUCT, R.MIN, R.MAX]
    if not dtype.is_floating_point:
        ops += list(INT_ONLY_OPS)
    return ops


def check_all_reduce(c):
    for dtype in DTYPES:
        for n in SIZES:
            for op in _ops_for(dtype):
                kind = "prod" if op == R.PRODUCT else "bits" if op in INT_ONLY_OPS else "small"
                want = values(n, dtype, c.rank, n, kind)
                got = want.clone()
                dist.all_reduce(want, op=op, group=c.gloo)
                dist.all_reduce(got, op=op, group=c.topo)
                c.equal(got, want, f"all_reduce {dtype} n={n} {op}")
            if dtype.is_floating_point:  # gloo has no AVG: compare with SUM / n
                total = values(n, dtype, c.rank, n)
                got = total.clone()
                dist.all_reduce(total, group=c.gloo)
                dist.all_reduce(got, op=R.AVG, group=c.topo)
                c.close(got, (total.double() / c.ws).to(dtype), f"all_reduce AVG {dtype} n={n}",
                        rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=1e-6)


def check_all_reduce_shapes(c):
    # empty, 0-d, non-contiguous (result copied back into the caller's view)
    for dtype in DTYPES:
        empty = torch.empty(0, dtype=dtype)
        dist.all_reduce(empty, group=c.topo)
        c.expect(empty.numel() == 0, "empty all_reduce changed the tensor")
        scalar = torch.tensor(c.rank + 1, dtype=dtype)
        dist.all_reduce(scalar, group=c.topo)
        c.equal(scalar, torch.tensor(c.ws * (c.ws + 1) // 2, dtype=dtype), f"0-d {dtype}")
        base = values(5 * 7, dtype, c.rank).reshape(5, 7)
        want = base.t().contiguous()
        dist.all_reduce(want, group=c.gloo)
        view = base.t()
        dist.all_reduce(view, group=c.topo)
        c.expect(not view.is_contiguous(), "test setup: view should be non-contiguous")
        c.equal(view.contiguous(), want, f"non-contiguous all_reduce {dtype}")
        big = values(300_000, dtype, c.rank).reshape(1000, 300)[:, ::2]  # large + strided
        want = big.contiguous()
        dist.all_reduce(want, group=c.gloo)
        dist.all_reduce(big, group=c.topo)
        c.equal(big.contiguous(), want, f"large strided all_reduce {dtype}")


def check_broadcast_reduce(c):
    for dtype in DTYPES:
        for n in (1, 13, 70001):
            for root in {0, c.ws - 1}:
                want = values(n, dtype, c.rank, root)
                got = want.clone()
                dist.broadcast(want, root, group=c.gloo)
                dist.broadcast(got, root, group=c.topo)
                c.equal(got, want, f"broadcast {dtype} n={n} root={root}")
                for op in (R.SUM, R.MAX):
                    want = values(n, dtype, c.rank, root + 1)
                    got = want.clone()
                    dist.reduce(want, root, op=op, group=c.gloo)
                    dist.reduce(got, root, op=op, group=c.topo)
                    # non-root buffers: gloo leaves scratch there, so compare on the root only
                    if c.rank == root:
                        c.equal(got, want, f"reduce {dtype} n={n} root={root} {op}")


def _gather_single():
    return getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _reduce_scatter_single():
    return getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def check_all_gather(c):
    for dtype in DTYPES:
        for n in (1, 13, 70001):
            inp = values(n, dtype, c.rank, n)
            want = [torch.empty(n, dtype=dtype) for _ in range(c.ws)]
            got = [torch.full((n,), 99, dtype=dtype) for _ in range(c.ws)]
            dist.all_gather(want, inp, group=c.gloo)
            dist.all_gather(got, inp, group=c.topo)
            c.equal(got, want, f"all_gather {dtype} n={n}")
            flat = torch.cat(want)
            for name, fn in (("all_gather_single", _gather_single()),
                             ("all_gather_into_tensor", dist.all_gather_into_tensor)):
                out = torch.empty(c.ws * n, dtype=dtype)
                fn(out, inp, group=c.topo)
                c.equal(out, flat, f"{name} {dtype} n={n}")
                stacked = torch.empty(c.ws, n, dtype=dtype)
                fn(stacked, inp, group=c.topo)
                c.equal(stacked, flat.view(c.ws, n), f"{name} stacked {dtype} n={n}")


    ins = [values(3, torch.float32, c.rank), values(2, torch.float32, c.rank, 1).view(1, 2)]
    want = [[torch.empty_like(t) for t in ins] for _ in range(c.ws)]
    got = [[torch.full_like(t, 99) for t in ins] for _ in range(c.ws)]
    dist.all_gather_coalesced(want, ins, group=c.gloo)
    dist.all_gather_coalesced(got, ins, group=c.topo)
    for r in range(c.ws):
        c.equal(got[r], want[r], f"all_gather_coalesced from rank {r}")


def check_reduce_scatter(c):
    for dtype in DTYPES:
        for n in (1, 13, 70001):
            for op in (R.SUM, R.MIN, R.PRODUCT) if n < 1000 else (R.SUM,):
                kind = "prod" if op == R.PRODUCT else "small"
                ins = [values(n, dtype, c.rank, p, kind) for p in range(c.ws)]
                want = torch.empty(n, dtype=dtype)
                got = torch.full((n,), 99, dtype=dtype)
                dist.reduce_scatter(want, [t.clone() for t in ins], op=op, group=c.gloo)
                dist.reduce_scatter(got, ins, op=op, group=c.topo)
                c.equal(got, want, f"reduce_scatter {dtype} n={n} {op}")
                for name, fn in (("reduce_scatter_single", _reduce_scatter_single()),
                                 ("reduce_scatter_tensor", dist.reduce_scatter_tensor)):
                    out = torch.full((n,), 99, dtype=dtype)
                    fn(out, torch.cat(ins), op=op, group=c.topo)
                    c.equal(out, want, f"{name} {dtype} n={n} {op}")
            if dtype.is_floating_point:
                ins = torch.cat([values(n, dtype, c.rank, p) for p in range(c.ws)])
                total = torch.empty(n, dtype=dtype)
                dist.reduce_scatter_tensor(total, ins.clone(), group=c.gloo)
                out = torch.empty(n, dtype=dtype)
                dist.reduce_scatter_tensor(out, ins, op=R.AVG, group=c.topo)
                c.close(out, (total.double() / c.ws).to(dtype), f"reduce_scatter AVG {dtype}",
                        rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=1e-6)


def _a2a_splits(rank, ws, salt):
    """rows rank -> peer: includes zeros and uneven counts."""
    return [(rank + 2 * peer + salt) % 3 for peer in range(ws)]


def check_all_to_all(c):
    a2a = getattr(dist, "all_to_all_single")
    for dtype in DTYPES:
        # even split, 1-D
        for per_peer in (1, 5, 20000):
            inp = values(per_peer * c.ws, dtype, c.rank, per_peer)
            want = torch.empty_like(inp)
            got = torch.full_like(inp, 99)
            a2a(want, inp, group=c.gloo)
            a2a(got, inp, group=c.topo)
            c.equal(got, want, f"all_to_all_single even {dtype} per_peer={per_peer}")
        # uneven rows of a 2-D tensor, zero-row splits included
        for salt, cols in ((0, 3), (1, 1), (2, 9000)):
            in_splits = _a2a_splits(c.rank, c.ws, salt)
            out_splits = [_a2a_splits(p, c.ws, salt)[c.rank] for p in range(c.ws)]
            inp = values(sum(in_splits) * cols, dtype, c.rank, salt).view(-1, cols)
            want = torch.empty(sum(out_splits), cols, dtype=dtype)
            got = torch.full((sum(out_splits), cols), 99, dtype=dtype)
            a2a(want, inp, out_splits, in_splits, group=c.gloo)
            a2a(got, inp, out_splits, in_splits, group=c.topo)
            c.equal(got, want, f"all_to_all_single uneven {dtype} cols={cols} "
                               f"in={in_splits} out={out_splits}")
        # everything empty on this rank except what goes to itself
        in_splits = [2 if p == c.rank else 0 for p in range(c.ws)]
        inp = values(2, dtype, c.rank).view(2, 1)
        got = torch.full((2, 1), 99, dtype=dtype)
        a2a(got, inp, in_splits, in_splits, group=c.topo)
        c.equal(got, inp, f"all_to_all_single self-only {dtype}")
        # list form, uneven sizes including empty tensors: closed-form expectation
        ins = [values((c.rank + p) % 3 * 2, dtype, c.rank, p) for p in range(c.ws)]
        outs = [torch.full(((p + c.rank) % 3 * 2,), 99, dtype=dtype) for p in range(c.ws)]
        dist.all_to_all(outs, ins, group=c.topo)
        c.equal(outs, [values((p + c.rank) % 3 * 2, dtype, p, c.rank) for p in range(c.ws)],
                f"all_to_all list {dtype}")


def check_gather_scatter(c):
    for dtype in DTYPES:
        for n in (1, 13, 70001):
            for root in {0, c.ws - 1}:
                inp = values(n, dtype, c.rank, root)
                want = [torch.empty(n, dtype=dtype) for _ in range(c.ws)]
                got = [torch.full((n,), 99, dtype=dtype) for _ in range(c.ws)]
                is_root = c.rank == root
                dist.gather(inp, want if is_root else None, dst=root, group=c.gloo)
                dist.gather(inp, got if is_root else None, dst=root, group=c.topo)
                if is_root:
                    c.equal(got, want, f"gather {dtype} n={n} root={root}")
                chunks = [values(n, dtype, c.rank, p) for p in range(c.ws)]
                want = torch.empty(n, dtype=dtype)
                got = torch.full((n,), 99, dtype=dtype)
                dist.scatter(want, chunks if is_root else None, src=root, group=c.gloo)
                dist.scatter(got, chunks if is_root else None, src=root, group=c.topo)
                c.equal(got, want, f"scatter {dtype} n={n} root={root}")


def check_send_recv_barrier(c):
    nxt, prv = (c.rank + 1) % c.ws, (c.rank - 1) % c.ws
    for dtype in DTYPES:
        for n in (1, 1000, 70001):
            out = values(n, dtype, c.rank, n)
            inp = torch.full((n,), 99, dtype=dtype)
            if c.rank % 2 == 0:
                dist.send(out, nxt, group=c.topo)
                dist.recv(inp, prv, group=c.topo)
            else:
                dist.recv(inp, prv, group=c.topo)
                dist.send(out, nxt, group=c.topo)
            c.equal(inp, values(n, dtype, prv, n), f"send/recv ring {dtype} n={n}")
        # non-blocking, small: every rank posts its send first
        out = values(10, dtype, c.rank, 3)
        inp = torch.full((10,), 99, dtype=dtype)
        works = [dist.isend(out, nxt, group=c.topo), dist.irecv(inp, prv, group=c.topo)]
        for w in works:
            w.wait()
        c.equal(inp, values(10, dtype, prv, 3), f"isend/irecv {dtype}")
    for _ in range(3):
        dist.barrier(group=c.topo)
    try:
        dist.recv(torch.empty(1), group=c.topo)
        c.errors.append("recv without src should raise")
    except (NotImplementedError, RuntimeError):
        pass


def check_cpp_entry_points(c):
    """The names torch's C++ trampoline calls (what DDP and functional collectives reach).

    Calling a base-class method (dist.ProcessGroup.allreduce(pg, ...)) enters C++ and comes
    back through the trampoline; torch 2.13 binds all_gather_single / reduce_scatter_single
    without virtual dispatch, so those two are reached through functional collectives."""
    PG = dist.ProcessGroup  # calling the base class method goes through C++ and back
    C = torch._C._distributed_c10d
    n, ws = 6, c.ws
    inp = values(n, torch.float32, c.rank)
    allg = torch.cat([values(n, torch.float32, p) for p in range(ws)])
    outs = [torch.empty(ws * n), torch.empty(ws * 2, dtype=torch.int64)]
    ins = [inp, torch.tensor([c.rank, 7])]
    PG.allgather_into_tensor_coalesced(c.topo, outs, ins).wait()
    c.equal(outs, [allg, torch.tensor([[p, 7] for p in range(ws)]).view(-1)],
            "C++ allgather_into_tensor_coalesced")
    big = torch.cat([values(n, torch.float32, c.rank, p) for p in range(ws)])
    want = torch.empty(n)
    dist.reduce_scatter_tensor(want, big.clone(), group=c.gloo)
    got2 = [torch.empty(n), torch.empty(n)]
    PG.reduce_scatter_tensor_coalesced(c.topo, got2, [big, big * 2],
                                       C.ReduceScatterOptions()).wait()
    c.equal(got2, [want, want * 2], "C++ reduce_scatter_tensor_coalesced")
    want_rs = want
    a2a_in = values(ws * 3, torch.int64, c.rank)
    want = torch.empty_like(a2a_in)
    dist.all_to_all_single(want, a2a_in, group=c.gloo)
    got = torch.empty_like(a2a_in)
    PG.alltoall_base(c.topo, got, a2a_in, [], []).wait()
    c.equal(got, want, "C++ alltoall_base")
    want_a2a = want
    ts = [values(5, torch.float32, c.rank), values(3, torch.int64, c.rank, 1),
          values(70001, torch.float32, c.rank, 2)]
    want = [t.clone() for t in ts]
    for t in want:
        dist.all_reduce(t, group=c.gloo)
    work = PG.allreduce_coalesced(c.topo, ts, C.AllreduceCoalescedOptions())
    work.wait()
    c.equal(ts, want, "C++ allreduce_coalesced")
    t = values(9, torch.float32, c.rank)
    fut = PG.allreduce(c.topo, [t]).get_future()
    value = fut.wait()
    c.expect(isinstance(value, list) and value[0] is t, "future value must be the tensor list")
    want = values(9, torch.float32, c.rank)
    dist.all_reduce(want, group=c.gloo)
    c.equal(t, want, "C++ allreduce via future")
    # functional collectives resolve the group by name and call it from C++
    try:
        import torch.distributed._functional_collectives as fc
    except ImportError:
        return
    t = values(11, torch.float32, c.rank)
    want = t.clone()
    dist.all_reduce(want, group=c.gloo)
    got = fc.wait_tensor(fc.all_reduce(t, "sum", c.topo))
    c.equal(got, want, "functional all_reduce")
    got = fc.wait_tensor(fc.all_gather_tensor(inp, 0, c.topo))
    c.equal(got, allg, "functional all_gather_tensor")
    got = fc.wait_tensor(fc.reduce_scatter_tensor(big, "sum", 0, c.topo))
    c.equal(got, want_rs, "functional reduce_scatter_tensor")
    got = fc.wait_tensor(fc.all_to_all_single(a2a_in, None, None, c.topo))
    c.equal(got, want_a2a, "functional all_to_all_single")


def check_async(c):
    """Several outstanding operations, large ones on the progress thread, waited out of order."""
    big = [values(300_000, torch.float32, c.rank, i) for i in range(3)]
    small = [values(7, torch.int64, c.rank, i) for i in range(4)]
    want_big = [t.clone() for t in big]
    want_small = [t.clone() for t in small]
    for t in want_big + want_small:
        dist.all_reduce(t, group=c.gloo)
    bcast = values(100_000, torch.bfloat16, c.rank, 9)
    want_bcast = bcast.clone()
    dist.broadcast(want_bcast, c.ws - 1, group=c.gloo)
    gathered = torch.empty(c.ws * 7, dtype=torch.int64)
    works = []
    works.append(dist.all_reduce(big[0], group=c.topo, async_op=True))
    works.append(dist.all_reduce(small[0], group=c.topo, async_op=True))  # queued behind big
    works.append(dist.broadcast(bcast, c.ws - 1, group=c.topo, async_op=True))
    works.append(dist.all_reduce(big[1], group=c.topo, async_op=True))
    works.append(dist.all_reduce(small[1], group=c.topo, async_op=True))
    works.append(_gather_single()(gathered, small[3].clone(), group=c.topo, async_op=True))
    works.append(dist.all_reduce(big[2], group=c.topo, async_op=True))
    works.append(dist.all_reduce(small[2], group=c.topo, async_op=True))
    futs = [w.get_future() for w in works]
    for w in reversed(works):
        c.expect(w.wait() in (True, None), "wait() should return True")
    for f in futs:
        f.wait()
        c.expect(isinstance(f.value(), list), "future value should be a list of tensors")
    c.expect(all(w.is_completed() for w in works), "all works completed after wait")
    c.equal(big + small[:3], want_big + want_small[:3], "async all_reduce")
    c.equal(bcast, want_bcast, "async broadcast")
    c.equal(gathered, torch.cat([values(7, torch.int64, p, 3) for p in range(c.ws)]),
            "async all_gather_single")
    # a blocking call after async ones waits its turn
    t = values(5, torch.float32, c.rank)
    w = dist.all_reduce(values(200_000, torch.float32, c.rank), group=c.topo, async_op=True)
    dist.all_reduce(t, group=c.topo)
    w.wait()
    want = values(5, torch.float32, c.rank)
    dist.all_reduce(want, group=c.gloo)
    c.equal(t, want, "blocking after async")


def check_subgroups(c):
    ws = c.ws
    # every rank creates every group, in the same order
    if ws == 2:
        specs = [[1], [0, 1]]
    else:
        specs = [[1, 3], [0, 2], [3, 2, 1], [0]]
    for ranks in specs:
        topo = dist.new_group(ranks, backend="topocomm")
        ref = dist.new_group(ranks, backend="gloo")
        if c.rank not in ranks:
            c.expect(topo == dist.GroupMember.NON_GROUP_MEMBER, f"{ranks}: non-member group")
            continue
        grank = sorted(ranks).index(c.rank)
        c.expect(topo.rank() == grank and topo.size() == len(ranks), f"{ranks}: rank/size")
        c.expect(dist.get_backend(topo) == "topocomm", f"{ranks}: backend name")
        for dtype in DTYPES:
            for n in (3, 70001):
                want = values(n, dtype, c.rank, len(ranks))
                got = want.clone()
                dist.all_reduce(want, op=R.MAX, group=ref)
                dist.all_reduce(got, op=R.MAX, group=topo)
                c.equal(got, want, f"subgroup {ranks} all_reduce {dtype} n={n}")
        src = max(ranks)  # global rank
        want = values(4, torch.int64, c.rank, 1)
        got = want.clone()
        dist.broadcast(want, src, group=ref)
        dist.broadcast(got, src, group=topo)
        c.equal(got, want, f"subgroup {ranks} broadcast src={src}")
        out = torch.empty(len(ranks) * 3)
        _gather_single()(out, values(3, torch.float32, c.rank), group=topo)
        c.equal(out, torch.cat([values(3, torch.float32, p) for p in sorted(ranks)]),
                f"subgroup {ranks} all_gather")
        dist.destroy_process_group(topo)
        dist.destroy_process_group(ref)
    # two topocomm groups used interleaved
    g1 = dist.new_group(backend="topocomm")
    g2 = dist.new_group(list(range(ws)), backend="topocomm")
    c.expect(g1.group_name != g2.group_name, "distinct group names")
    a, b = values(70001, torch.float32, c.rank), values(5, torch.int64, c.rank)
    wa = dist.all_reduce(a, group=g1, async_op=True)
    dist.all_reduce(b, op=R.MIN, group=g2)
    wa.wait()
    want_a, want_b = values(70001, torch.float32, c.rank), values(5, torch.int64, c.rank)
    dist.all_reduce(want_a, group=c.gloo)
    dist.all_reduce(want_b, op=R.MIN, group=c.gloo)
    c.equal([a, b], [want_a, want_b], "two topocomm groups interleaved")
    dist.destroy_process_group(g1)
    dist.destroy_process_group(g2)


def _train(group, rank, hook=None, steps=4):
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(1234 + rank)  # different per rank: DDP must broadcast rank 0's weights
    model = nn.Sequential(nn.Linear(32, 300), nn.Tanh(), nn.Linear(300, 260), nn.Tanh(),
                          nn.Linear(260, 3))  # 300x260 floats: a bucket above the inline limit
    ddp = DDP(model, process_group=group, bucket_cap_mb=0.2)
    if hook is not None:
        ddp.register_comm_hook(group, hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(99 + rank)
    for _ in range(steps):
        x = torch.randn(16, 32, generator=gen)
        y = torch.randn(16, 3, generator=gen)
        opt.zero_grad()
        nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def check_ddp(c):
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    ref = _train(c.gloo, c.rank)
    for label, hook in (("reducer", None), ("allreduce_hook", default_hooks.allreduce_hook)):
        got = _train(c.topo, c.rank, hook)
        for i, (g, w) in enumerate(zip(got, ref)):
            c.expect(torch.allclose(g, w, rtol=1e-5, atol=1e-6),
                     f"DDP {label} param {i}: max diff {(g - w).abs().max().item():.3g}")
        # the same weights on every rank
        for i, p in enumerate(got):
            p0 = p.clone()
            dist.broadcast(p0, 0, group=c.gloo)
            c.equal(p, p0, f"DDP {label} param {i} equal across ranks")


def check_errors(c):
    t = torch.ones(4)
    try:
        dist.all_reduce(t, op=dist._make_nccl_premul_sum(2.0), group=c.topo)
        c.errors.append("PREMUL_SUM should raise")
    except (ValueError, RuntimeError) as exc:
        c.expect("PREMUL_SUM" in str(exc) or "op" in str(exc), f"unclear error: {exc}")
    c.equal(t, torch.ones(4), "PREMUL_SUM must not touch the tensor")
    try:
        dist.all_reduce(torch.ones(2, dtype=torch.int64), op=R.AVG, group=c.topo)
        c.errors.append("AVG on int64 should raise")
    except (ValueError, TypeError, RuntimeError):
        pass
    # ranks disagree on the size: every rank raises (inline: at the call; queued: at wait)
    try:
        dist.all_reduce(torch.ones(3 + c.rank), group=c.topo)
        c.errors.append("mismatched sizes should raise")
    except (ValueError, RuntimeError):
        pass
    work = dist.all_reduce(torch.ones(100_000 + c.rank), group=c.topo, async_op=True)
    try:
        work.wait()
        c.errors.append("mismatched sizes (queued) should raise at wait()")
    except (ValueError, RuntimeError):
        pass
    t = values(3, torch.float32, c.rank)  # the group is still usable
    dist.all_reduce(t, group=c.topo)
    want = values(3, torch.float32, c.rank)
    dist.all_reduce(want, group=c.gloo)
    c.equal(t, want, "group usable after argument errors")


def check_unusual_tensors(c):
    """Found by review, each against gloo: complex reduce / reduce_scatter (torch converts
    complex to real for all_reduce only), results written into a non-contiguous view of a
    leaf that requires grad and into an inference tensor, send/recv of dtypes no reduction
    takes (int16), and an output whose elements share memory (expand()): a ValueError on
    every rank before data moves, the group usable after."""
    ws = c.ws
    for name, fn in (
            ("reduce complex", lambda t, g: dist.reduce(t, dst=ws - 1, group=g)),
            ("all_reduce complex", lambda t, g: dist.all_reduce(t, group=g))):
        outs = []
        for g in (c.topo, c.gloo):
            t = torch.complex(values(5, torch.float32, c.rank), values(5, torch.float32, c.rank, 1))
            fn(t, g)
            outs.append(t)
        if name.startswith("all_reduce") or c.rank == ws - 1:  # reduce: defined on dst only
            c.equal(outs[0], outs[1], name)
    outs = []
    for g in (c.topo, c.gloo):
        inp = torch.complex(values(2 * ws, torch.float64, c.rank), values(2 * ws, torch.float64, c.rank, 2))
        o = torch.empty(2, dtype=torch.complex128)
        dist.reduce_scatter_tensor(o, inp, group=g)
        outs.append(o)
    c.equal(outs[0], outs[1], "reduce_scatter_tensor complex")
    outs = []
    for g in (c.topo, c.gloo):  # a conjugate view as input
        inp = torch.complex(values(2 * ws, torch.float32, c.rank), values(2 * ws, torch.float32, c.rank, 3))
        o = torch.empty(2, dtype=torch.complex64)
        dist.reduce_scatter_tensor(o, inp.conj(), group=g)
        outs.append(o)
    c.equal(outs[0], outs[1], "reduce_scatter_tensor of a conjugate view")
    # the root's tensor is only read: an expand()ed one is fine (gloo sends the 4 elements'
    # worth of memory from its data pointer: 7 and what lies beyond it)
    x = torch.tensor([7.0]).expand(4) if c.rank == 0 else torch.zeros(4)
    dist.broadcast(x, src=0, group=c.topo)
    c.equal(x, torch.full((4,), 7.0), "broadcast from an expand()ed root tensor")
    try:
        dist.reduce_scatter_tensor(torch.empty(2, dtype=torch.complex64),
                                   torch.ones(2 * ws, dtype=torch.complex64), op=R.MAX,
                                   group=c.topo)
        c.errors.append("MAX on complex should raise")
    except ValueError as exc:
        c.expect("complex" in str(exc), f"unclear error: {exc}")
    outs = []
    for g in (c.topo, c.gloo):
        p = values(6, torch.float32, c.rank).reshape(2, 3).requires_grad_()
        dist.all_reduce(p.t(), group=g)
        with torch.inference_mode():
            x = values(6, torch.float32, c.rank).reshape(2, 3)
        dist.broadcast(x.t(), src=ws - 1, group=g)
        outs += [p.detach(), x.clone()]
    c.equal(outs[0], outs[2], "all_reduce into a view of a leaf that requires grad")
    c.equal(outs[1], outs[3], "broadcast into an inference tensor's view")
    outs = []
    for g in (c.topo, c.gloo):
        x = values(7, torch.int64, c.rank).to(torch.int16)
        if c.rank == 0:
            dist.send(x, 1, group=g)
        elif c.rank == 1:
            dist.recv(x, 0, group=g)
        outs.append(x)
    c.equal(outs[0], outs[1], "send/recv int16")
    x = torch.tensor([1.0 + c.rank]).expand(4)
    try:
        dist.all_reduce(x, group=c.topo)
        c.errors.append("all_reduce into an expand()ed tensor should raise")
    except ValueError as exc:
        c.expect("share memory" in str(exc) and type(exc).__name__ == "ValueError",
                 f"unclear error: {type(exc).__name__}: {exc}")
    t = values(3, torch.float32, c.rank)
    dist.all_reduce(t, group=c.topo)
    want = values(3, torch.float32, c.rank)
    dist.all_reduce(want, group=c.gloo)
    c.equal(t, want, "group usable after the expand()ed output")


CHECKS = {f.__name__[len("check_"):]: f for f in (
    check_all_reduce, check_all_reduce_shapes, check_broadcast_reduce, check_all_gather,
    check_reduce_scatter, check_all_to_all, check_gather_scatter, check_send_recv_barrier,
    check_cpp_entry_points, check_async, check_subgroups, check_ddp, check_errors,
    check_unusual_tensors)}
SHUTDOWN = "shutdown_stops_threads"


def _rank_main(rank, world_size, port, topo_default, results):
    def report(name, error, seconds=0.0):
        results.put((rank, name, error, seconds))

    import faulthandler

    faulthandler.dump_traceback_later(WORLD_TIMEOUT_S - 15, exit=False)  # where a hang sits
    try:
        warnings.simplefilter("ignore")
        import comms  # noqa: F401  registers the backend

        store = dist.TCPStore("127.0.0.1", port, world_size + 1, False, timeout=STORE_TIMEOUT)
        kw = dict(store=store, rank=rank, world_size=world_size, timeout=STORE_TIMEOUT)
        if topo_default:
            dist.init_process_group("topocomm", **kw)
            topo, gloo = dist.group.WORLD, dist.new_group(backend="gloo")
        else:
            dist.init_process_group("gloo", **kw)
            topo, gloo = dist.new_group(backend="topocomm"), dist.group.WORLD
        assert dist.get_backend(topo) == "topocomm", dist.get_backend(topo)
        for name, check in CHECKS.items():
            ctx = Ctx(rank, world_size, topo, gloo)
            ctx.topo_is_default = topo_default
            start = time.perf_counter()
            try:
                check(ctx)
                report(name, "\n".join(ctx.errors) or None, time.perf_counter() - start)
            except Exception:
                report(name, "\n".join(ctx.errors + [traceback.format_exc()]),
                       time.perf_counter() - start)
            dist.barrier(group=gloo)  # resynchronise between checks
        dist.destroy_process_group()
        left = [t.name for t in threading.enumerate() if t.name.startswith("topocomm-progress")]
        report(SHUTDOWN, f"threads left after destroy_process_group: {left}" if left else None)
    except Exception:
        report("world", traceback.format_exc())
    finally:
        results.put((rank, None, None, 0.0))
        results.close()
        results.join_thread()  # Queue.put is asynchronous: flush before _exit
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # a wedged Communicator must not keep the rank alive


# --------------------------------------------------------------------------- parent side
_WORLDS: dict = {}


def _run_world(world_size):
    import multiprocessing as mp

    server = dist.TCPStore("127.0.0.1", 0, world_size + 1, True, timeout=STORE_TIMEOUT,
                           wait_for_workers=False)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    topo_default = world_size == 2
    procs = [ctx.Process(target=_rank_main, args=(r, world_size, server.port, topo_default,
                                                  results), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    outcome = {}  # name -> {rank: error or None}
    finished = set()
    deadline = _now() + WORLD_TIMEOUT_S
    exited_at = {}   # rank -> when it was first seen exited without its last message
    try:
        while len(finished) < world_size:
            try:
                wait_s = max(0.1, min(1.0, deadline - _now()))
                rank, name, error, seconds = results.get(timeout=wait_s)
            except queue.Empty:
                if _now() > deadline:
                    outcome.setdefault("world", {})[-1] = (
                        f"world of {world_size} timed out after {WORLD_TIMEOUT_S} s; "
                        f"ranks finished: {sorted(finished)}")
                    break
                # a rank that exited right after sending its last message may be seen gone
                # before that message is read: dead only when still missing a while later
                now = _now()
                for r, p in enumerate(procs):
                    if not p.is_alive() and r not in finished:
                        exited_at.setdefault(r, now)
                dead = [r for r, t in exited_at.items() if r not in finished and now - t > 10]
                if dead:
                    codes = [procs[r].exitcode for r in dead]
                    outcome.setdefault("world", {})[-1] = f"ranks {dead} died (exit {codes})"
                    break
                continue
            if name is None:
                finished.add(rank)
            else:
                outcome.setdefault(name, {})[rank] = error
                outcome.setdefault("seconds", {}).setdefault(name, {})[rank] = seconds
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        del server
    return outcome


def _now():
    return time.monotonic()


def _world(world_size):
    if world_size not in _WORLDS:
        _WORLDS[world_size] = _run_world(world_size)
    return _WORLDS[world_size]


@pytest.mark.timeout(WORLD_TIMEOUT_S + 60)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("check", list(CHECKS) + [SHUTDOWN])
def test_torch_backend(world_size, check):
    outcome = _world(world_size)
    world_errors = outcome.get("world", {})
    per_rank = outcome.get(check, {})
    failures = [f"rank {r}: {e}" for r, e in sorted(per_rank.items()) if e]
    missing = [r for r in range(world_size) if r not in per_rank]
    if missing:
        failures.append(f"ranks {missing} never reported this check")
    if failures:
        failures += [f"world: {e}" for e in world_errors.values()]
        failures.append(f"seconds per check (rank 0): "
                        f"{ {k: round(v.get(0, -1), 2) for k, v in outcome['seconds'].items()} }"
                        if "seconds" in outcome else "no check finished")
        pytest.fail("\n".join(failures), pytrace=False)
