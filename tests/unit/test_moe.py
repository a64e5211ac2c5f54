"""comms.moe on the threads transport: dispatch then combine equals the plain per-expert
pipeline (comms.moe.refs) for random routings and world sizes 1-4, numpy and torch, float32,
bfloat16 and float64; gradients through autograd; layout counts; bad input raising on
every rank.

Exactness: the reference with exact_order=True sums each token's expert outputs in the
order comms.moe does (per destination rank a fold over the topk slots, then a fold over the
ranks), so outputs must be bitwise equal in every dtype. The plain reference
(exact_order=False, what frameworks run) sums in another order: float32 results then differ
in the last bits only (checked with a tolerance of a few ulps of the largest term).
Gradients come from torch autograd through both pipelines, whose backward passes also sum in
different orders: float64 is compared at 1e-12, float32 at 1e-5 relative.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

import comms.moe as moe  # noqa: E402
from comms.moe import refs  # noqa: E402

SETTINGS = settings(max_examples=12, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


def routing(rank, n, T, k, E, seed, p_unrouted=0.2, mode="random"):
    """x unique per (rank, token, column), topk_idx (distinct or repeated experts, -1
    entries), positive weights."""
    g = torch.Generator().manual_seed(seed * 7919 + rank)
    H = 5
    x = (torch.arange(T * H, dtype=torch.float64).reshape(T, H) * 0.37 + rank * 101.5
         + torch.randn(T, H, generator=g, dtype=torch.float64))
    if mode == "one_expert":
        idx = torch.full((T, k), E - 1, dtype=torch.int64)
    elif mode == "rank0":
        idx = torch.randint(0, max(E // n, 1), (T, k), generator=g)
    elif mode == "distinct" and k <= E:
        idx = torch.rand(T, E, generator=g).topk(k, dim=1).indices
    else:
        idx = torch.randint(0, E, (T, k), generator=g)
    idx[torch.rand(T, k, generator=g) < p_unrouted] = -1
    w = torch.rand(T, k, generator=g) + 0.1
    return x, idx, w


def expert_fn(rows, local_expert, rank):
    """A per-row function that differs per expert and rank (exact inputs, any dtype)."""
    scale = (local_expert.to(rows.dtype) + 1.5 + rank)[:, None]
    return rows * scale - 0.25


def run_pair(world, T_of, k, E, seed, dtype=torch.float32, mode="random", p_unrouted=0.2,
             numpy_api=False):
    """On every rank: comms.moe and the reference on the same routing; returns per-rank
    (got, exact-order ref, plain ref, dispatch result, ref dispatch)."""
    n = world.size

    def body(comm):
        x, idx, w = routing(comm.rank, n, T_of(comm.rank), k, E, seed, p_unrouted, mode)
        x = x.to(dtype)
        rd = refs.reference_dispatch(x, idx, w, E, comm)
        if numpy_api:
            res = moe.dispatch(x.numpy(), idx.numpy(), w.numpy(), E, comm)
            y = expert_fn(torch.from_numpy(res.expert_x), torch.from_numpy(res.local_expert),
                          comm.rank).numpy()
            got = torch.from_numpy(moe.combine(y, res.handle))
        else:
            res = moe.dispatch(x, idx, w, E, comm)
            y = expert_fn(res.expert_x, res.local_expert, comm.rank)
            got = moe.combine(y, res.handle)
        y_ref = expert_fn(rd.expert_x, torch.as_tensor(np.asarray(res.local_expert)), comm.rank)
        exact = refs.reference_combine(y_ref, rd, exact_order=True)
        plain = refs.reference_combine(y_ref, rd)
        return got, exact, plain, res, rd, (x, idx, w)
    return world.run(body)


def check_pair(results, n, E, dtype, numpy_api=False):
    L = E // n
    for rank, (got, exact, plain, res, rd, (x, idx, w)) in enumerate(results):
        ex = torch.as_tensor(np.asarray(res.expert_x)) if numpy_api else res.expert_x
        assert torch.equal(ex, rd.expert_x), f"rank {rank}: expert_x differs"
        assert list(np.asarray(res.num_tokens_per_expert)) == rd.num_tokens_per_expert_list
        assert got.dtype == exact.dtype and got.shape == x.shape
        assert torch.equal(got, exact), f"rank {rank}: combine differs from exact-order ref: " \
            f"{(got.double() - exact.double()).abs().max()}"
        if dtype == torch.float32 and got.numel():
            tol = 8 * torch.finfo(torch.float32).eps * max(plain.abs().max().item(), 1.0) * 8
            assert (got - plain).abs().max().item() <= tol
        # every row says where it came from, and carries that slot's weight
        src_rank = np.asarray(res.src_rank)
        src_tok = np.asarray(res.src_token_idx)
        slot = np.asarray(res.topk_slot)
        le = np.asarray(res.local_expert)
        wts = np.asarray(res.weights.detach() if not numpy_api else res.weights)
        for q in range(n):
            xq, iq, wq = results[q][5]
            m = src_rank == q
            assert np.array_equal(iq.numpy()[src_tok[m], slot[m]], le[m] + rank * L)
            assert np.array_equal(wq.numpy()[src_tok[m], slot[m]].astype(np.float32), wts[m])
            want = xq.to(dtype)[torch.as_tensor(src_tok[m])]
            assert torch.equal(ex[torch.as_tensor(np.flatnonzero(m))], want)
        # recv_x holds each (source rank, token) once
        pairs = set(zip(np.asarray(res.recv_src_rank).tolist(),
                        np.asarray(res.recv_src_token).tolist()))
        assert len(pairs) == res.num_recv_tokens


# ------------------------------------------------------------------------ equality


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_equals_reference(worlds, n, dtype):
    E = 4 * n
    res = run_pair(worlds(n), lambda r: 17 + 3 * r, 3, E, seed=n, dtype=dtype)
    check_pair(res, n, E, dtype)


@pytest.mark.parametrize("n", [1, 3])
def test_numpy_api_equals_reference(worlds, n):
    E = 2 * n
    res = run_pair(worlds(n), lambda r: 9 + r, 2, E, seed=5, numpy_api=True)
    check_pair(res, n, E, torch.float32, numpy_api=True)
    got, _, _, r, _, _ = res[0]
    assert isinstance(r.recv_x, np.ndarray) and isinstance(r.expert_x, np.ndarray)


@pytest.mark.parametrize("mode,p_unrouted,T_of", [
    ("one_expert", 0.0, lambda r: 11),           # all tokens to one expert (the last rank)
    ("rank0", 0.0, lambda r: 7),                 # only rank 0 receives; others get nothing
    ("random", 1.0, lambda r: 6),                # every entry -1: nothing routed, zeros back
    ("random", 0.3, lambda r: 0 if r % 2 else 9),  # ranks with zero tokens
    ("random", 0.0, lambda r: 0),                # zero tokens everywhere
    ("distinct", 0.5, lambda r: 13),
])
@pytest.mark.parametrize("n", [2, 4])
def test_edge_routings(worlds, n, mode, p_unrouted, T_of):
    E = 2 * n
    res = run_pair(worlds(n), T_of, 2, E, seed=3, mode=mode, p_unrouted=p_unrouted)
    check_pair(res, n, E, torch.float32)
    if mode == "rank0":
        assert all(r[3].num_recv_tokens == 0 for r in res[1:])
    if p_unrouted == 1.0:
        assert all(not r[0].any() for r in res)


def test_k1_and_repeated_experts(worlds):
    for k, mode in ((1, "random"), (4, "random")):   # random mode may repeat an expert
        res = run_pair(worlds(2), lambda r: 10, k, 4, seed=11, mode=mode)
        check_pair(res, 2, 4, torch.float32)


@SETTINGS
@given(n=st.sampled_from([1, 2, 3, 4]), seed=st.integers(0, 10**6), k=st.integers(1, 4),
       per_rank=st.integers(1, 3), t_max=st.integers(0, 24),
       p_unrouted=st.sampled_from([0.0, 0.25, 0.9]),
       mode=st.sampled_from(["random", "distinct", "one_expert", "rank0"]))
def test_random_routings_equal_reference(worlds, n, seed, k, per_rank, t_max, p_unrouted, mode):
    E = n * per_rank
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, t_max + 1, n)
    res = run_pair(worlds(n), lambda r: int(sizes[r]), k, E, seed, mode=mode,
                   p_unrouted=p_unrouted)
    check_pair(res, n, E, torch.float32)


def test_handle_reused_and_layout_given(worlds):
    w = worlds(3)

    def body(comm):
        x, idx, wt = routing(comm.rank, 3, 12, 2, 6, seed=2)
        x = x.float()
        lay = moe.layout(idx, 6, comm)
        a = moe.dispatch(x, idx, wt, 6, comm, layout=lay)
        b = moe.dispatch(x, idx, wt, 6, comm)
        out1 = moe.combine(a.expert_x, a.handle)
        out2 = moe.combine(b.expert_x, b.handle, comm)
        out3 = moe.combine(a.expert_x * 2, a.handle)      # the handle is reusable
        return torch.equal(out1, out2) and torch.equal(out3, out1 * 2)
    assert all(w.run(body))


# ------------------------------------------------------------------------ layout


@pytest.mark.parametrize("n", [1, 2, 4])
def test_layout_counts(worlds, n):
    E = 3 * n

    def body(comm):
        _, idx, _ = routing(comm.rank, n, 23, 3, E, seed=9)
        lay = moe.layout(idx, E, comm)
        hosts = [[r for r in range(n) if r % 2 == 0], [r for r in range(n) if r % 2]]
        hosts = [h for h in hosts if h]
        lay2 = moe.layout(idx.numpy(), E, comm, hosts=hosts)
        return idx, lay, lay2, hosts
    for idx, lay, lay2, hosts in worlds(n).run(body):
        idx = idx.numpy()
        dst = np.where(idx >= 0, idx // 3, -1)
        in_rank = np.array([[r in set(row) for r in range(n)] for row in dst])
        assert np.array_equal(lay.is_token_in_rank.numpy(), in_rank)
        assert lay.num_tokens_per_rank.tolist() == in_rank.sum(0).tolist()
        assert lay.num_tokens_per_expert.tolist() == [int((idx == e).sum()) for e in range(E)]
        assert lay.num_tokens_per_host.tolist() == [idx.shape[0] - int((dst < 0).all(1).sum())]
        assert isinstance(lay2.num_tokens_per_host, np.ndarray)
        want = [int(in_rank[:, h].any(1).sum()) for h in hosts]
        assert lay2.num_tokens_per_host.tolist() == want


# ------------------------------------------------------------------------ autograd


def _layer(comm, disp, comb, x, idx, w, E, W):
    res = disp(x, idx, w, E, comm)
    chunks = torch.split(res.expert_x, res.num_tokens_per_expert_list)
    y = torch.cat([c @ W[e] for e, c in enumerate(chunks)]) if chunks else res.expert_x
    return comb(y, res)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gradients_match_reference(worlds, n, dtype):
    E = 2 * n
    H = 5

    def body(comm):
        x0, idx, w0 = routing(comm.rank, n, 9 + comm.rank, 3, E, seed=21)
        x0 = x0.to(dtype)
        gen = torch.Generator().manual_seed(100 + comm.rank)
        W = torch.randn(E // n, H, H, generator=gen, dtype=torch.float64).to(dtype)
        gout = torch.randn(x0.shape, generator=gen, dtype=torch.float64).to(dtype)
        out = []
        for disp, comb in ((moe.dispatch, lambda y, r: moe.combine(y, r.handle)),
                           (refs.reference_dispatch, lambda y, r: refs.reference_combine(y, r))):
            x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
            o = _layer(comm, disp, comb, x, idx, w, E, W)
            o.backward(gout)
            out.append((o.detach(), x.grad, w.grad))
        return out
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    for (o1, gx1, gw1), (o2, gx2, gw2) in worlds(n).run(body):
        for a, b, what in ((o1, o2, "out"), (gx1, gx2, "x.grad"), (gw1, gw2, "topk_weights.grad")):
            assert a.dtype == b.dtype, what
            torch.testing.assert_close(a, b, rtol=rtol, atol=rtol, msg=what)


def test_gradient_bfloat16_and_weights_only(worlds):
    """bfloat16 grads close to the reference; a graph where only the weights need grad."""
    def body(comm):
        x0, idx, w0 = routing(comm.rank, 2, 8, 2, 4, seed=4)
        res = []
        for dtype in (torch.bfloat16,):
            x, w = x0.to(dtype).requires_grad_(), w0.clone().requires_grad_()
            r = moe.dispatch(x, idx, w, 4, comm)
            moe.combine(r.expert_x * 2, r.handle).sum().backward()
            xr, wr = x0.to(dtype).requires_grad_(), w0.clone().requires_grad_()
            rd = refs.reference_dispatch(xr, idx, wr, 4, comm)
            refs.reference_combine(rd.expert_x * 2, rd).sum().backward()
            res.append((x.grad, xr.grad, w.grad, wr.grad))
        w = w0.clone().requires_grad_()
        r = moe.dispatch(x0, idx, w, 4, comm)
        moe.combine(r.expert_x, r.handle).pow(2).sum().backward()
        wr = w0.clone().requires_grad_()
        rd = refs.reference_dispatch(x0, idx, wr, 4, comm)
        refs.reference_combine(rd.expert_x, rd).pow(2).sum().backward()
        return res, w.grad, wr.grad
    for res, gw, gwr in worlds(2).run(body):
        for gx, gxr, gwt, gwtr in res:
            torch.testing.assert_close(gx.float(), gxr.float(), rtol=0.02, atol=0.02)
            torch.testing.assert_close(gwt, gwtr, rtol=0.02, atol=0.5)
        torch.testing.assert_close(gw, gwr, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------ bad input


def _errors(results):
    return [r if isinstance(r, BaseException) else None for r in results]


def _still_works(w):
    n = w.size

    def body(comm):
        x, idx, wt = routing(comm.rank, n, 6, 2, 2 * n, seed=1)
        r = moe.dispatch(x.float(), idx, wt, 2 * n, comm)
        return moe.combine(r.expert_x, r.handle).shape
    assert w.run(body) == [torch.Size([6, 5])] * n


@pytest.mark.parametrize("bad,arg,text", [
    ("idx_range", "topk_idx", "out of range"),
    ("idx_low", "topk_idx", "out of range"),
    ("idx_dtype", "topk_idx", "integer"),
    ("idx_rows", "topk_idx", "rows"),
    ("w_shape", "topk_weights", "shape"),
    ("w_dtype", "topk_weights", "floating"),
    ("x_dtype", "x", "dtype"),
    ("x_ndim", "x", "2-D"),
    ("experts", "num_experts", "evenly"),
])
def test_bad_dispatch_input_raises_on_every_rank(worlds, bad, arg, text):
    w = worlds(3)

    def body(comm):
        x, idx, wt = routing(comm.rank, 3, 6, 2, 6, seed=1)
        x, E = x.float(), 6
        if comm.rank == 1:
            if bad == "idx_range":
                idx[2, 1] = 6
            elif bad == "idx_low":
                idx[0, 0] = -2
            elif bad == "idx_dtype":
                idx = idx.float()
            elif bad == "idx_rows":
                idx = idx[:5]
            elif bad == "w_shape":
                wt = wt[:, :1]
            elif bad == "w_dtype":
                wt = (wt * 10).long()
            elif bad == "x_dtype":
                x = x.long()
            elif bad == "x_ndim":
                x = x.reshape(-1)
            elif bad == "experts":
                E = 7
        moe.dispatch(x, idx, wt, E, comm)
    errs = _errors(w.run(body, raise_errors=False))
    assert all(isinstance(e, (ValueError, TypeError)) for e in errs), errs
    assert arg in str(errs[1]) and text in str(errs[1]), errs[1]
    for e in (errs[0], errs[2]):
        assert "rank 1" in str(e) and "moe.dispatch" in str(e), e
    _still_works(w)


@pytest.mark.parametrize("bad", ["hidden", "dtype", "experts", "k"])
def test_ranks_disagreeing_raise_everywhere(worlds, bad):
    w = worlds(2)

    def body(comm):
        x, idx, wt = routing(comm.rank, 2, 6, 2, 4, seed=1)
        x, E = x.float(), 4
        if comm.rank == 1:
            if bad == "hidden":
                x = torch.cat([x, x], 1)
            elif bad == "dtype":
                x = x.double()
            elif bad == "experts":
                E, idx = 8, torch.where(idx >= 0, idx * 2, idx)
            elif bad == "k":
                idx, wt = idx[:, :1], wt[:, :1]
        moe.dispatch(x, idx, wt, E, comm)
    errs = _errors(w.run(body, raise_errors=False))
    assert all(isinstance(e, ValueError) and "disagree" in str(e) for e in errs), errs
    assert str(errs[0]) == str(errs[1])
    _still_works(w)


@pytest.mark.parametrize("bad", ["rows", "hidden", "dtype", "kind", "handle", "group"])
def test_bad_combine_input_raises_on_every_rank(worlds, bad):
    w = worlds(2)
    other = worlds(1)

    def body(comm):
        x, idx, wt = routing(comm.rank, 2, 6, 2, 4, seed=1)
        r = moe.dispatch(x.float(), idx, wt, 4, comm)
        y, handle, group = r.expert_x, r.handle, None
        if comm.rank == 1:
            if bad == "rows":
                y = torch.cat([y, y[:1]])
            elif bad == "hidden":
                y = y[:, :3].contiguous()
            elif bad == "dtype":
                y = y.double()
            elif bad == "kind":
                y = y.numpy()
            elif bad == "handle":
                handle = "not a handle"
            elif bad == "group":
                group = other.comms[0]
        if bad == "handle" and comm.rank == 1:
            # a garbage handle cannot say which group: the caller's group signals the peers
            group = comm
        moe.combine(y, handle, group)
    errs = _errors(w.run(body, raise_errors=False))
    assert all(isinstance(e, (ValueError, TypeError)) for e in errs), errs
    assert "moe.combine" in str(errs[0]) and "rank 1" in str(errs[0]), errs[0]
    name = {"rows": "expert_out", "hidden": "expert_out", "dtype": "expert_out",
            "kind": "expert_out", "handle": "handle", "group": "handle"}[bad]
    assert name in str(errs[1]), errs[1]
    _still_works(w)


def test_group_must_be_topocomm_or_communicator():
    with pytest.raises(TypeError, match="group"):
        moe.dispatch(torch.zeros(2, 3), torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1),
                     2, group=object())


# ------------------------------------------------------------------------ kernels


def test_native_and_numpy_kernels_agree():
    from comms.core import dtypes as dt
    from comms.kernels import reference_moe as kernels_np
    try:
        from comms.kernels import _native
    except ImportError:
        pytest.skip("C helpers not built")
    rng = np.random.default_rng(0)
    addr = lambda a: a.__array_interface__["data"][0]  # noqa: E731
    for code, npd in ((dt.F32, np.float32), (dt.F64, np.float64), (dt.BF16, np.uint16)):
        for H in (1, 7, 8, 33):
            if npd is np.uint16:
                src = (rng.standard_normal((20, H)).astype(np.float32).view(np.uint32)
                       >> 16).astype(np.uint16)
                src[0, 0] = 0x7FC1               # a NaN travels as a NaN
            else:
                src = rng.standard_normal((20, H)).astype(npd)
            b = src[::-1].copy()
            counts = rng.integers(0, 5, 9)
            off = np.zeros(10, np.int64)
            off[1:] = np.cumsum(counts)
            ent = rng.integers(0, 40, int(off[-1])).astype(np.int64)
            wts = rng.random(int(off[-1])).astype(np.float32)
            for weights in (wts, None):
                outs = []
                for mod in (_native, kernels_np):
                    o = np.full((9, H), 7, npd)
                    mod.moe_reduce_rows(addr(o), 9, addr(off), addr(ent) if ent.size else 0,
                                        addr(weights) if weights is not None else 0, addr(src),
                                        20, addr(b), H, code)
                    outs.append(o)
                assert np.array_equal(outs[0].view(np.uint8), outs[1].view(np.uint8)), (code, H)
            ia = rng.integers(0, 20, 15).astype(np.int64)
            dots = []
            for mod in (_native, kernels_np):
                o = np.empty(15, np.float32)
                mod.moe_row_dot(addr(o), 15, addr(src), addr(ia), addr(b), 0, H, code)
                dots.append(o)
            assert np.array_equal(dots[0], dots[1], equal_nan=True), (code, H)
            gathered = []
            for mod in (_native, kernels_np):
                o = np.empty((15, H), npd)
                mod.moe_gather_rows(addr(o), addr(src), addr(ia), 15, H * src.itemsize)
                gathered.append(o)
            assert np.array_equal(gathered[0].view(np.uint8), gathered[1].view(np.uint8))
            assert np.array_equal(gathered[0].view(np.uint8), src[ia].view(np.uint8))


def test_reduce_rows_fold_order_is_the_documented_one():
    """The first add is +0 + w*y (so -0 becomes +0) and no FMA: a*b rounded, then added."""
    from comms.core import dtypes as dt
    from comms.moe import ops
    y = np.array([[-0.0, 1e8, 1.0000001]], np.float32)
    y2 = np.array([[-0.0, -1e8, 3.0]], np.float32)
    src = np.concatenate([y, y2])
    w = np.array([1.0, 1.0], np.float32)
    out = np.empty((1, 3), np.float32)
    ops.reduce_rows(out, np.array([0, 2], np.int64), np.array([0, 1], np.int64), w, src,
                    1 << 62, None, dt.F32)
    want = (np.float32(0) + w[0] * y[0]) + w[1] * y2[0]
    assert np.array_equal(out[0].view(np.uint32), want.view(np.uint32))


def test_exchange_scratch_goes_with_close():
    """The exchange's reusable scratch lives in the Communicator and close() releases it."""
    from comms.moe.exchange import MOE_SCRATCH_OWNER
    from comms.testing import ThreadWorld
    with ThreadWorld(2) as w:
        def body(comm):
            x, idx, wt = routing(comm.rank, 2, 13, 2, 4, seed=3)
            res = moe.dispatch(x, idx, wt, 4, comm)
            moe.combine(res.expert_x, res.handle)
            return sorted(comm.kept(MOE_SCRATCH_OWNER))
        kept = w.run(body)
        comms_ = list(w.comms)
    assert all(kept), kept                                  # the calls kept scratch ...
    assert all(c._closed and not c.kept(MOE_SCRATCH_OWNER) for c in comms_)  # ... until close


@pytest.mark.parametrize("grad", [False, True])
def test_device_tensors_take_the_cpu_path_and_come_back(worlds, monkeypatch, grad):
    """The CUDA path of dispatch/combine (inputs copied to the host, results copied to the
    input's device), with the CPU standing in for the GPU: the same values and gradients
    as the plain call, every result on the input's device. tests/gpu runs it on a GPU."""
    import threading

    from comms.moe import api
    seen, mode = [], threading.local()      # per rank thread: staged or not

    def device_of(a):
        if not getattr(mode, "staged", False):
            return None
        seen.append(type(a).__name__)
        return a.device if isinstance(a, torch.Tensor) else None
    monkeypatch.setattr(api, "_device_of", device_of)
    E, n = 4, 2

    def body(comm):
        x0, idx, w0 = routing(comm.rank, n, 11 + comm.rank, 2, E, seed=33)
        out = []
        for staged in (False, True):
            mode.staged = staged
            x, w = x0.clone().requires_grad_(grad), w0.clone().requires_grad_(grad)
            res = moe.dispatch(x, idx, w, E, comm)
            y = res.expert_x * 2 + 1
            o = moe.combine(y, res.handle)
            if grad:
                o.square().sum().backward()
            out.append((res.expert_x.detach(), res.row_token_idx, o.detach(),
                        x.grad, w.grad, res.device))
        return out
    for plain, staged in worlds(n).run(body):
        assert plain[5] is None and staged[5] == torch.device("cpu")
        for a, b in zip(plain[:5], staged[:5]):
            assert (a is None and b is None) or torch.equal(a, b)
    assert seen      # the staged calls asked for the device


@SETTINGS
@given(n=st.sampled_from([1, 2, 3, 4]), k=st.sampled_from([1, 2, 4]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
       t_max=st.sampled_from([0, 1, 9, 40]), seed=st.integers(0, 10**6),
       mode=st.sampled_from(["random", "rank0", "one_expert", "distinct"]))
def test_rows_kept_on_the_device_equal_the_host_path(worlds, monkeypatch, n, k, dtype, t_max,
                                                     seed, mode):
    """dispatch/combine keeping the rows on the "GPU" (comms/moe/device.py: torch gathers and
    slot-ordered folds, the all-to-alls on the tensors themselves), with the CPU standing in
    for the GPU, give the host path's bits: recv_x, expert_x and the combined output, every
    dtype, tokens routed nowhere, ranks with no tokens."""
    import threading

    from comms.moe import api
    mode_ = threading.local()

    def device_of(a):
        return a.device if getattr(mode_, "device", False) and isinstance(a, torch.Tensor) \
            else None
    monkeypatch.setattr(api, "_device_of", device_of)
    E = 2 * n

    def body(comm):
        T = int(np.random.default_rng(seed + comm.rank).integers(0, t_max + 1))
        x, idx, w = routing(comm.rank, n, T, k, E, seed, 0.2, mode)
        x = x.to(dtype)
        out = []
        for on_device in (False, True):
            mode_.device = on_device
            res = moe.dispatch(x, idx, w, E, comm)
            y = expert_fn(res.expert_x, res.local_expert, comm.rank)
            o = moe.combine(y, res.handle)
            out.append((res.recv_x, res.expert_x, res.weights, o,
                        res.handle.device_rows is not None))
        return out
    for host, dev in worlds(n).run(body):
        assert host[4] is False and dev[4] is True
        for a, b in zip(host[:4], dev[:4]):
            assert a.dtype == b.dtype and torch.equal(a, b)



def _as_device(monkeypatch):
    """Every torch tensor counts as on a GPU (the CPU standing in for it)."""
    from comms.moe import api
    monkeypatch.setattr(api, "_device_of",
                        lambda a: a.device if isinstance(a, torch.Tensor) else None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combine_on_the_device_gives_the_host_paths_gradient(worlds, monkeypatch, dtype):
    """Expert outputs that want a gradient: combine stays on the device and its backward
    (a dispatch of the gradient, then w * grad) gives the host path's bits."""
    import threading

    from comms.moe import api
    mode = threading.local()
    monkeypatch.setattr(api, "_device_of", lambda a: a.device if getattr(
        mode, "device", False) and isinstance(a, torch.Tensor) else None)
    E, n = 6, 3

    def body(comm):
        x, idx, w = routing(comm.rank, n, 13 + 4 * comm.rank, 3, E, seed=8)
        got = []
        for on_device in (False, True):
            mode.device = on_device
            res = moe.dispatch(x.to(dtype), idx, w, E, comm)
            y = (res.expert_x * 2 - 1).detach().requires_grad_(True)
            out = moe.combine(y, res.handle)
            out.float().square().sum().backward()
            got.append((res.handle.device_rows is not None, out.detach(), y.grad))
        return got
    for host, dev in worlds(n).run(body):
        assert host[0] is False and dev[0] is True
        assert torch.equal(host[1], dev[1]) and torch.equal(host[2], dev[2])


def test_device_x_across_hosts_takes_the_cpu_path(worlds, monkeypatch):
    _as_device(monkeypatch)

    def body(comm):
        x, idx, w = routing(comm.rank, 4, 9, 2, 8, seed=3)
        res = moe.dispatch(x, idx, w, 8, comm, hosts=[[0, 1], [2, 3]])
        out = moe.combine(res.expert_x * 3, res.handle)
        ref = moe.combine(res.expert_x * 3, res.handle)
        return res.handle.device_rows is None and torch.equal(out, ref)
    assert worlds(4).run(body) == [True] * 4


def test_bad_arguments_on_the_device_path_raise_on_every_rank(worlds, monkeypatch):
    _as_device(monkeypatch)

    def body(comm):
        x, idx, w = routing(comm.rank, 2, 7, 2, 4, seed=4)
        errors = []
        x.requires_grad_(True)
        try:          # weights that are not a tensor, with autograd on: a TypeError here
            moe.dispatch(x, idx, w.tolist() if comm.rank == 1 else w, 4, comm)
        except (TypeError, ValueError) as exc:
            errors.append(type(exc).__name__)
        x.requires_grad_(False)
        res = moe.dispatch(x, idx, w, 4, comm)
        y = res.expert_x * 2
        try:          # expert outputs not where the dispatch kept its rows
            moe.combine(y.numpy() if comm.rank == 0 else y, res.handle)
        except (TypeError, ValueError) as exc:
            errors.append(type(exc).__name__)
        out = moe.combine(y, res.handle)                 # the group still works
        return errors, res.handle.device_rows is not None, out.shape
    res = worlds(2).run(body)
    assert [r[0] for r in res] == [["ValueError", "TypeError"], ["TypeError", "ValueError"]]
    assert all(r[1] for r in res)
