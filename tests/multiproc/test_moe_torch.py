"""comms.moe through torch.distributed on 2 spawned ranks: the topocomm default group against
the reference pipeline on a gloo group, in the same processes.

One world for the module (spawning costs seconds here); every check reports separately.
The world is killed after WORLD_TIMEOUT_S, so a hang fails the test instead of CI.
"""
import json

import pytest

pytest.importorskip("torch")

from comms.testing import run_procs  # noqa: E402

WORLD_TIMEOUT_S = 150

RANK_CODE = r'''
import datetime, json, os, sys, traceback
import torch, torch.distributed as dist
import comms.moe as moe
from comms.moe import refs

rank, n = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
dist.init_process_group("topocomm", rank=rank, world_size=n,
                        timeout=datetime.timedelta(seconds=60))
topo, gloo = dist.group.WORLD, dist.new_group(backend="gloo")
E, H = 8, 16
results = {}


def routing(seed, T=40, k=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed * 31 + rank)
    x = torch.randn(T, H, generator=g).to(dtype)
    idx = torch.randint(-1, E, (T, k), generator=g)
    return x, idx, torch.rand(T, k, generator=g)


def check_equal_to_gloo_reference():
    errs = []
    for dtype in (torch.float32, torch.bfloat16):
        x, idx, w = routing(1, dtype=dtype)
        res = moe.dispatch(x, idx, w, E, topo)
        rd = refs.reference_dispatch(x, idx, w, E, gloo)
        if not torch.equal(res.expert_x, rd.expert_x):
            errs.append(f"{dtype}: expert_x differs")
        y = res.expert_x * 3 - 1
        out = moe.combine(y, res.handle)
        want = refs.reference_combine(y, rd, exact_order=True)
        if not torch.equal(out, want):
            errs.append(f"{dtype}: combine differs by {(out - want).abs().max()}")
    return errs


def check_training_matches_gloo_reference():
    errs = []
    params = []
    for disp, comb, group in ((moe.dispatch, lambda y, r: moe.combine(y, r.handle), topo),
                              (refs.reference_dispatch, refs.reference_combine, gloo)):
        torch.manual_seed(5 + rank)
        experts = torch.nn.ModuleList(torch.nn.Linear(H, H) for _ in range(E // n))
        router = torch.nn.Linear(H, E)
        opt = torch.optim.SGD(list(experts.parameters()) + list(router.parameters()), lr=0.1)
        for step in range(3):
            x, _, _ = routing(10 + step)
            probs = torch.softmax(router(x), dim=1)
            w, idx = probs.topk(2, dim=1)
            res = disp(x, idx, w, E, group)
            chunks = torch.split(res.expert_x, res.num_tokens_per_expert_list)
            y = torch.cat([experts[e](c) for e, c in enumerate(chunks)])
            loss = comb(y, res).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        params.append([p.detach().clone() for p in list(experts.parameters())
                       + list(router.parameters())])
    for i, (a, b) in enumerate(zip(*params)):
        if not torch.allclose(a, b, rtol=1e-5, atol=1e-6):
            errs.append(f"param {i}: max diff {(a - b).abs().max().item():.3g}")
    return errs


def check_gloo_group_is_refused():
    x, idx, w = routing(2)
    try:
        moe.dispatch(x, idx, w, E, gloo)
    except TypeError as exc:
        return [] if "topocomm" in str(exc) else [f"unclear error: {exc}"]
    return ["a gloo group must be refused"]


def check_bad_input_every_rank_then_usable():
    errs = []
    x, idx, w = routing(3)
    if rank == 1:
        idx[0, 0] = E
    try:
        moe.dispatch(x, idx, w, E, topo)
        errs.append("bad topk_idx on rank 1 must raise here too")
    except ValueError as exc:
        if ("topk_idx" if rank == 1 else "rank 1") not in str(exc):
            errs.append(f"unclear error: {exc}")
    idx[0, 0] = 0
    res = moe.dispatch(x, idx, w, E, topo)
    out = moe.combine(res.expert_x, res.handle)
    rd = refs.reference_dispatch(x, idx, w, E, gloo)
    if not torch.equal(out, refs.reference_combine(rd.expert_x, rd, exact_order=True)):
        errs.append("wrong result after the error")
    return errs


def check_after_async_collective():
    """A queued async all-reduce on the same group runs before dispatch's exchanges."""
    big = torch.ones(300_000) * (rank + 1)
    work = dist.all_reduce(big, group=topo, async_op=True)
    x, idx, w = routing(4)
    res = moe.dispatch(x, idx, w, E, topo)
    out = moe.combine(res.expert_x, res.handle)
    work.wait()
    errs = []
    if not torch.equal(big, torch.full((300_000,), float(n * (n + 1) // 2))):
        errs.append("async all_reduce result wrong")
    rd = refs.reference_dispatch(x, idx, w, E, gloo)
    if not torch.equal(out, refs.reference_combine(rd.expert_x, rd, exact_order=True)):
        errs.append("moe result wrong next to an async collective")
    return errs


for name, fn in list(globals().items()):
    if name.startswith("check_"):
        try:
            results[name[6:]] = fn()
        except Exception:
            results[name[6:]] = [traceback.format_exc()]
        dist.barrier(group=gloo)
print("RESULTS " + json.dumps(results), flush=True)
dist.destroy_process_group()
'''

CHECKS = ["equal_to_gloo_reference", "training_matches_gloo_reference", "gloo_group_is_refused",
          "bad_input_every_rank_then_usable", "after_async_collective"]


@pytest.fixture(scope="module")
def world():
    return run_procs(2, RANK_CODE, timeout=WORLD_TIMEOUT_S, env={"OMP_NUM_THREADS": "1"})


@pytest.mark.timeout(WORLD_TIMEOUT_S + 60)
@pytest.mark.parametrize("check", CHECKS)
def test_moe_torch(world, check):
    for rank, (rc, out, err) in enumerate(world):
        lines = [line for line in out.splitlines() if line.startswith("RESULTS ")]
        assert lines, f"rank {rank} (exit {rc}) reported nothing:\n{err[-3000:]}"
        got = json.loads(lines[-1][len("RESULTS "):])
        assert check in got, f"rank {rank}: {check} did not run"
        assert got[check] == [], f"rank {rank}: {check}: " + "\n".join(got[check])
