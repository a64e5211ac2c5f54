"""An all-reduce or reduce-scatter of a size the ring ran before takes the one-C-call path
(arrival and ring in one call, comms/algorithms/host/allreduce.py ring_once). Its header words are the
two-call path's, so a rank on either path meets the others; results against numpy for
every op, in place and out of place, numpy arrays and CPU tensors, across chunk and block
boundaries."""
import threading

import numpy as np
import pytest

from comms.algorithms.host import allreduce as ar
from comms.testing import ThreadWorld

pytestmark = pytest.mark.timeout(120)

# elements: above the 16 KiB small slot of ThreadWorld; a 96 KiB data area -> chunks of a
# few KiB, so every size spans several chunks and blocks
COUNTS = [5000, 4097, 65536 + 7, 20000]
OPS = {"sum": np.add.reduce, "max": np.maximum.reduce, "min": np.minimum.reduce,
       "prod": np.multiply.reduce}


def _inputs(rank, count, it, dtype):
    rng = np.random.default_rng(1000 * rank + it)
    if np.dtype(dtype).kind == "f":
        return rng.uniform(0.5, 1.5, count).astype(dtype)
    return rng.integers(1, 4, count).astype(dtype)


@pytest.fixture
def one_calls(monkeypatch):
    """How many all-reduces took the one-call ring path, per rank."""
    calls, lock, real = {}, threading.Lock(), ar.ring_once

    def counting(ctx, *args):
        with lock:
            calls[ctx.rank] = calls.get(ctx.rank, 0) + 1
        return real(ctx, *args)
    monkeypatch.setattr(ar, "ring_once", counting)
    return calls


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("op", list(OPS) + ["avg"])
def test_repeated_sizes_match_numpy(n, op, one_calls):
    dtype = np.float64 if op in ("prod", "avg") else np.int32
    with ThreadWorld(n, timeout=30, data_bytes=96 << 10) as w:
        def body(c):
            wrong, expect_one_call, seen = 0, 0, set()
            for it, count in enumerate(COUNTS * 3):
                x = _inputs(c.rank, count, it, dtype)
                ins = [_inputs(q, count, it, dtype) for q in range(n)]
                want = np.add.reduce(ins) / n if op == "avg" else OPS[op](ins)
                mode = (it + c.rank) % 3          # ranks mix modes within one call
                expect_one_call += mode != 2 and count in seen
                seen.add(count)
                if mode == 0:
                    got = x.copy()
                    c.allreduce(got, op=op)
                elif mode == 1:
                    got = np.full_like(x, -1)
                    c.allreduce(x, op=op, out=got)
                else:                             # out overlaps buf: the two-call path
                    big = np.zeros(count + 1, dtype)
                    big[:count] = x
                    c.allreduce(big[:count], op=op, out=big[1:])
                    got = big[1:]
                wrong += int((got != want).sum()) if op != "avg" else \
                    int((~np.isclose(got, want, rtol=1e-12)).sum())
            return wrong, expect_one_call
        results = w.run(body)
    assert [wrong for wrong, _ in results] == [0] * n
    # the first call of a size and the overlapping buffers take the two-call path
    assert one_calls == {r: results[r][1] for r in range(n)}


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("op", ["sum", "max", "avg"])
def test_reduce_scatter_repeated_sizes_match_numpy(n, op, one_calls):
    dtype = np.float64 if op == "avg" else np.int32
    per_rank = [1250, 1025, 16384 + 3, 5000]      # elements each rank keeps
    with ThreadWorld(n, timeout=30, data_bytes=96 << 10) as w:
        def body(c):
            wrong, expect_one_call, seen = 0, 0, set()
            for it, per in enumerate(per_rank * 3):
                count = per * n
                x = _inputs(c.rank, count, it, dtype)
                ins = [_inputs(q, count, it, dtype) for q in range(n)]
                full = np.add.reduce(ins) / n if op == "avg" else OPS[op](ins)
                want = full[c.rank * per:(c.rank + 1) * per]
                mode = (it + c.rank) % 3          # ranks mix modes within one call
                # a size is remembered by a two-call run that read send itself (no copy)
                expect_one_call += mode != 2 and count in seen
                if mode != 2:
                    seen.add(count)
                if mode == 0:                     # in place: recv is my block of send
                    c.reduce_scatter(x, x[c.rank * per:(c.rank + 1) * per], op=op)
                    got = x[c.rank * per:(c.rank + 1) * per]
                elif mode == 1:
                    got = np.full(per, -1, dtype)
                    c.reduce_scatter(x, got, op=op)
                else:                             # recv overlaps send elsewhere: two calls
                    c.reduce_scatter(x, x[1:per + 1], op=op)
                    got = x[1:per + 1]
                wrong += int((got != want).sum()) if op != "avg" else \
                    int((~np.isclose(got, want, rtol=1e-12)).sum())
            return wrong, expect_one_call
        results = w.run(body)
    assert [wrong for wrong, _ in results] == [0] * n
    assert one_calls == {r: results[r][1] for r in range(n) if results[r][1]}


def test_torch_tensors_in_place_take_the_one_call_path(one_calls):
    torch = pytest.importorskip("torch")
    n = 2
    with ThreadWorld(n, timeout=30, data_bytes=96 << 10) as w:
        def body(c):
            wrong = 0
            for it in range(4):
                t = torch.arange(30000, dtype=torch.float32) + c.rank + it
                c.allreduce(t)
                want = 2 * torch.arange(30000, dtype=torch.float32) + 1 + 2 * it
                wrong += int((t != want).sum())
            return wrong
        assert w.run(body) == [0] * n
    assert one_calls == {0: 3, 1: 3}


def test_a_data_area_too_small_for_the_ring_is_an_error_on_every_rank():
    """4 ranks' ring slots (4 slots x 4 blocks of a page and a chunk) do not fit 64 KiB: a
    CommError that says so on every rank, not a write past the area."""
    from comms.core.errors import CommError
    n = 4
    with ThreadWorld(n, timeout=30, data_bytes=64 << 10) as w:
        def body(c):
            try:
                c.allreduce(np.ones(20000, np.float32))
            except CommError as exc:
                return str(exc)
            return None
        msgs = w.run(body)
    assert all(m is not None and "data area" in m for m in msgs), msgs
