"""comms.moe across hosts: the two-stage path (network once per destination host, then
forwarded inside the host), on 4 thread ranks.

Two ways to get hosts: a `hosts=` override on a one-host group (every transfer still goes
through the group's all-to-all, the routing is the two-stage one), and real multi-host
groups (ThreadWorld hosts="AABB": tcp over loopback between the emulated hosts, the host's
own Communicator inside). Results must equal the reference summed in the hierarchical order
(comms.moe.refs.reference_combine(exact_order=True, hosts=...)) bit for bit.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import comms.moe as moe  # noqa: E402
from comms.moe import refs  # noqa: E402
from comms.testing import ThreadWorld  # noqa: E402

PLACEMENTS = {"contiguous": [[0, 1], [2, 3]], "interleaved": [[0, 2], [1, 3]],
              "uneven": [[0], [1, 2, 3]], "one_rank_each": [[0], [1], [2], [3]]}


@pytest.fixture(scope="module")
def multihost():
    made = {}

    def get(keys):
        if keys not in made:
            made[keys] = ThreadWorld(len(keys), timeout=30.0, hosts=keys)
        return made[keys]
    yield get
    for w in made.values():
        w.close()


def routing(rank, T, k, E, seed, p_unrouted=0.2, H=6):
    g = torch.Generator().manual_seed(seed * 7919 + rank)
    x = torch.randn(T, H, generator=g, dtype=torch.float64) + rank
    idx = torch.randint(0, E, (T, k), generator=g)
    idx[torch.rand(T, k, generator=g) < p_unrouted] = -1
    return x, idx, torch.rand(T, k, generator=g) + 0.1


def compare(world, hosts, dtype=torch.float32, T_of=lambda r: 11 + 2 * r, k=3, E=8, seed=0,
            grads=True):
    def body(comm):
        x, idx, w = routing(comm.rank, T_of(comm.rank), k, E, seed)
        x = x.to(dtype)
        res = moe.dispatch(x, idx, w, E, comm, hosts=hosts)
        rd = refs.reference_dispatch(x, idx, w, E, comm)
        y = res.expert_x * 3 - 1
        got = moe.combine(y, res.handle)
        want = refs.reference_combine(y, rd, exact_order=True, hosts=hosts)
        out = {"expert_x": torch.equal(res.expert_x, rd.expert_x), "combine": torch.equal(got, want),
               "route": type(res.handle.route).__name__, "res": res, "idx": idx}
        if grads:
            xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
            r = moe.dispatch(xg, idx, wg, E, comm, hosts=hosts)
            moe.combine(r.expert_x * 2 + 1, r.handle).pow(2).sum().backward()
            xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
            rr = refs.reference_dispatch(xr, idx, wr, E, comm)
            refs.reference_combine(rr.expert_x * 2 + 1, rr).pow(2).sum().backward()
            out["grads"] = (xg.grad, xr.grad, wg.grad, wr.grad)
        return out
    return world.run(body)


def check(results, dtype):
    for rank, r in enumerate(results):
        assert r["route"] == "HierRoute"
        assert r["expert_x"], f"rank {rank}: expert_x differs from the reference"
        assert r["combine"], f"rank {rank}: combine differs from the hierarchical-order reference"
        if "grads" in r:
            gx, gxr, gw, gwr = r["grads"]
            tol = 1e-12 if dtype == torch.float64 else 1e-4
            torch.testing.assert_close(gx, gxr, rtol=tol, atol=tol)
            torch.testing.assert_close(gw, gwr, rtol=tol, atol=tol)


@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hosts_override_equals_reference(worlds, placement, dtype):
    check(compare(worlds(4), PLACEMENTS[placement], dtype), dtype)


def test_hosts_override_bfloat16_and_edges(worlds):
    w = worlds(4)
    hosts = PLACEMENTS["contiguous"]
    check(compare(w, hosts, torch.bfloat16, grads=False), torch.bfloat16)
    check(compare(w, hosts, T_of=lambda r: 0 if r in (1, 2) else 9), torch.float32)
    check(compare(w, hosts, T_of=lambda r: 0), torch.float32)
    check(compare(w, [[0], [1]] if w.size == 2 else hosts, k=1, E=4), torch.float32)


@pytest.mark.parametrize("keys", ["AABB", "ABAB"])
def test_multihost_group_equals_reference(multihost, keys):
    w = multihost(keys)
    hosts = w.comms[0].hosts
    check(compare(w, None, torch.float32), torch.float32)
    # the group's topology is the default: same as passing it
    res = compare(w, hosts, torch.float32, grads=False)
    check(res, torch.float32)


def test_network_carries_each_token_once_per_host(worlds):
    """Stage A sends one row per (token, remote host); one stage would send one per
    (token, remote rank), the reference one per (token, remote expert)."""
    hosts = PLACEMENTS["contiguous"]
    res = compare(worlds(4), hosts, T_of=lambda r: 40, k=4, E=16, grads=False)
    for rank, r in enumerate(res):
        route, idx = r["res"].handle.route, r["idx"].numpy()
        mine = 0 if rank in hosts[0] else 1
        remote = hosts[1 - mine]
        dst = np.where(idx >= 0, idx // 4, -1)
        per_host = int(np.isin(dst, remote).any(1).sum())
        per_rank = sum(int((dst == q).any(1).sum()) for q in remote)
        per_expert = int(np.isin(dst, remote).sum())
        assert route.a_send_idx.size == per_host
        assert per_host < per_rank < per_expert


def test_ranks_disagreeing_on_hosts_raise_everywhere(worlds):
    w = worlds(4)

    def body(comm):
        x, idx, wt = routing(comm.rank, 5, 2, 8, 1)
        hosts = PLACEMENTS["interleaved" if comm.rank == 3 else "contiguous"]
        moe.dispatch(x.float(), idx, wt, 8, comm, hosts=hosts)
    errs = w.run(body, raise_errors=False)
    assert all(isinstance(e, ValueError) and "hosts" in str(e) for e in errs), errs


def test_bad_hosts_argument(worlds):
    w = worlds(2)

    def body(comm):
        x, idx, wt = routing(comm.rank, 5, 2, 4, 1)
        moe.dispatch(x.float(), idx, wt, 4, comm, hosts=[[0], [0, 1]] if comm.rank else None)
    errs = w.run(body, raise_errors=False)
    assert isinstance(errs[1], ValueError) and "hosts" in str(errs[1]), errs
    assert isinstance(errs[0], ValueError) and "rank 1" in str(errs[0]), errs


@pytest.mark.parametrize("bad", ["rows", "handle"])
@pytest.mark.parametrize("setup", ["AABB", "override"])
def test_bad_combine_input_on_one_rank_raises_on_every_host(multihost, worlds, setup, bad):
    """A two-stage combine starts inside each host. Rank 1 rejecting its expert_out (or
    handle) must make every rank raise ValueError at once, the other host's included (they
    wait in the group-wide step that follows), and leave the group usable; before, those
    ranks waited for the timeout and the group broke."""
    w = multihost("AABB") if setup == "AABB" else worlds(4)
    hosts = None if setup == "AABB" else PLACEMENTS["contiguous"]

    def body(comm):
        x, idx, wt = routing(comm.rank, 7, 2, 8, 3)
        r = moe.dispatch(x.float(), idx, wt, 8, comm, hosts=hosts)
        y, handle = r.expert_x, r.handle
        if comm.rank == 1:
            if bad == "rows":
                y = torch.cat([y, y[:1]])
            else:
                handle = "not a handle"
        moe.combine(y, handle, comm)
    errs = w.run(body, raise_errors=False)
    assert all(isinstance(e, (ValueError, TypeError)) for e in errs), errs
    assert ("expert_out" if bad == "rows" else "handle") in str(errs[1]), errs[1]

    def again(comm):
        x, idx, wt = routing(comm.rank, 7, 2, 8, 3)
        r = moe.dispatch(x.float(), idx, wt, 8, comm, hosts=hosts)
        return tuple(moe.combine(r.expert_x, r.handle, comm).shape)
    assert w.run(again) == [(7, 6)] * 4
