"""hypothesis: every collective equals a numpy reference for random shapes (0 and primes
included), dtypes, ops and world sizes 1-8, on the threads transport."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from comms.core import dtypes as dt
from comms.kernels.reference_ops import reduce_arrays

NP_DTYPES = {dt.F16: np.float16, dt.F32: np.float32, dt.F64: np.float64, dt.I8: np.int8,
             dt.U8: np.uint8, dt.I32: np.int32, dt.I64: np.int64, dt.BOOL: np.bool_}
OPS = [dt.SUM, dt.PROD, dt.MIN, dt.MAX, dt.BAND, dt.BOR, dt.BXOR]
SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
shapes = st.one_of(st.sampled_from([0, 1, 2, 3, 5, 7, 11, 13, 4099, 65537]),
                   st.integers(0, 3000)).flatmap(
    lambda n: st.sampled_from([(n,), (1, n), (n, 1)] if n else [(0,), (3, 0)]))


def make_input(rank, shape, code, seed):
    rng = np.random.default_rng(seed * 1009 + rank)
    npd = NP_DTYPES[code]
    if code == dt.BOOL:
        return rng.random(shape) < 0.5
    if code in (dt.F16, dt.F32, dt.F64):
        return rng.uniform(-4, 4, shape).astype(npd)
    info = np.iinfo(npd)
    return rng.integers(info.min, info.max, shape, dtype=npd, endpoint=True)


@SETTINGS
@given(n=st.sampled_from([1, 2, 3, 4, 5, 8]), shape=shapes, code=st.sampled_from(list(NP_DTYPES)),
       op=st.sampled_from(OPS), seed=st.integers(0, 2**16), inplace=st.booleans())
def test_allreduce_matches_reference(worlds, n, shape, code, op, seed, inplace):
    if not dt.op_supported(code, op):
        return
    w = worlds(n)
    inputs = [make_input(r, shape, code, seed) for r in range(n)]
    ref = reduce_arrays([x.reshape(-1) for x in inputs], op, code).reshape(shape)

    def body(comm):
        x = inputs[comm.rank].copy()
        if inplace:
            return comm.allreduce(x, op=op)
        out = np.empty_like(x)
        comm.allreduce(x, op=op, out=out)
        np.testing.assert_array_equal(x, inputs[comm.rank])  # input untouched
        return out
    for got in w.run(body):
        np.testing.assert_array_equal(got, ref)


@SETTINGS
@given(n=st.sampled_from([1, 2, 3, 4, 5, 8]), per=st.sampled_from([0, 1, 2, 7, 13, 1031, 40009]),
       code=st.sampled_from([dt.F32, dt.F64, dt.I32, dt.I64, dt.U8, dt.F16]),
       op=st.sampled_from([dt.SUM, dt.MAX, dt.MIN, dt.PROD]), seed=st.integers(0, 2**16))
def test_reduce_scatter_matches_reference(worlds, n, per, code, op, seed):
    w = worlds(n)
    inputs = [make_input(r, (n * per,), code, seed) for r in range(n)]
    ref = reduce_arrays(inputs, op, code)

    def body(comm):
        out = np.empty(per, NP_DTYPES[code])
        comm.reduce_scatter(inputs[comm.rank], out, op=op)
        return out
    for r, got in enumerate(w.run(body)):
        np.testing.assert_array_equal(got, ref[r * per:(r + 1) * per])


@SETTINGS
@given(n=st.sampled_from([1, 2, 3, 4, 5, 8]), seed=st.integers(0, 2**16),
       code=st.sampled_from([dt.F32, dt.I8, dt.F64, dt.BOOL]), hi=st.sampled_from([3, 50, 20000]))
def test_all_to_all_matches_reference(worlds, n, seed, code, hi):
    w = worlds(n)
    rng = np.random.default_rng(seed)
    m = rng.integers(0, hi, (n, n))
    m[rng.random((n, n)) < 0.25] = 0
    inputs = [make_input(r, (int(m[r].sum()),), code, seed) for r in range(n)]

    def body(comm):
        r = comm.rank
        out = np.empty(int(m[:, r].sum()), NP_DTYPES[code])
        comm.all_to_all(inputs[r], out, m[r], m[:, r])
        return out
    for r, got in enumerate(w.run(body)):
        parts = [inputs[p][int(m[p, :r].sum()):int(m[p, :r].sum()) + m[p, r]] for p in range(n)]
        np.testing.assert_array_equal(got, np.concatenate(parts))


@SETTINGS
@given(n=st.sampled_from([1, 2, 3, 4, 5, 8]), count=st.sampled_from([0, 1, 5, 4099, 70001]),
       root_pick=st.integers(0, 7), seed=st.integers(0, 2**16))
def test_rooted_and_gather_collectives_match_reference(worlds, n, count, root_pick, seed):
    w = worlds(n)
    root = root_pick % n
    inputs = [make_input(r, (count,), dt.F32, seed) for r in range(n)]
    allv = np.concatenate(inputs) if n else None

    def body(comm):
        r = comm.rank
        b = inputs[r].copy()
        comm.broadcast(b, root=root)
        ag = np.empty(n * count, np.float32)
        comm.allgather(inputs[r], ag)
        g = np.empty(n * count, np.float32) if r == root else None
        comm.gather(inputs[r], g, root=root)
        s = np.empty(count, np.float32)
        comm.scatter(allv if r == root else None, s, root=root)
        red = inputs[r].copy()
        comm.reduce(red, root=root, op="max")
        return b, ag, g, s, red
    ref_max = reduce_arrays(inputs, dt.MAX, dt.F32)
    for r, (b, ag, g, s, red) in enumerate(w.run(body)):
        np.testing.assert_array_equal(b, inputs[root])
        np.testing.assert_array_equal(ag, allv)
        if r == root:
            np.testing.assert_array_equal(g, allv)
            np.testing.assert_array_equal(red, ref_max)
        else:
            np.testing.assert_array_equal(red, inputs[r])
        np.testing.assert_array_equal(s, allv[r * count:(r + 1) * count])


def test_bfloat16_allreduce_matches_torch():
    torch = pytest.importorskip("torch")
    from comms.testing import ThreadWorld
    n = 3
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(30011, generator=gen).to(torch.bfloat16) for _ in range(n)]
    ref = inputs[0]
    for x in inputs[1:]:
        ref = ref + x   # torch rounds to bfloat16 after every add, as topocomm does
    with ThreadWorld(n) as w:
        for got in w.run(lambda c: c.allreduce(inputs[c.rank].clone())):
            assert torch.equal(got, ref)
