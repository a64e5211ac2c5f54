"""Kernel micro-benchmarks (pytest-benchmark): the C helpers' data kernels against the numpy
and torch calls that do the same work, and against this machine's copy rate.

    make bench-kernels                       # or: python -m pytest bench/kernels
    python -m pytest bench/kernels --benchmark-json out.json

Not part of `make test` (its time budget; this folder is outside tests/). Every benchmark
checks its result against the numpy twin before timing, so a fast wrong kernel fails here.
Each records the bytes it moves (read + written per call); the table printed at the end
(bench/kernels/conftest.py) gives GB/s and the share of the machine's copy rate, the
copy_numpy row of the same size. Sizes: 16 MiB per input (past the caches: memory-bound) and 256 KiB
(cache-resident, the pieces the ring and pairwise algorithms move).
"""
from __future__ import annotations

import numpy as np
import pytest

from comms.core import dtypes as dt
from comms.kernels import native
from comms.kernels import reference_moe as ref_moe

pytestmark = pytest.mark.kernel_bench
SIZES = {"16M": 16 << 20, "256K": 256 << 10}


@pytest.fixture(scope="module")
def nat():
    native.impl()
    if not native.is_native:
        pytest.skip(f"C helpers not loaded: {native.why_not_native}")
    return native.impl()


def _f32(nbytes, seed=0):
    return np.random.default_rng(seed).standard_normal(nbytes // 4).astype(np.float32)


@pytest.mark.parametrize("size", SIZES)
def test_copy_numpy(timed, size):
    """The machine's copy rate for this size (read + write)."""
    src, dst = _f32(SIZES[size]), np.empty(SIZES[size] // 4, np.float32)
    timed(2 * SIZES[size], np.copyto, dst, src)


@pytest.mark.parametrize("size", SIZES)
def test_copy_c(timed, nat, size):
    src, dst = _f32(SIZES[size]), np.zeros(SIZES[size] // 4, np.float32)
    nat.copy(native.addr(dst), native.addr(src), src.nbytes)
    assert np.array_equal(dst, src)
    timed(2 * SIZES[size], nat.copy, native.addr(dst), native.addr(src), src.nbytes)


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("size", SIZES)
def test_reduce_f32_c(timed, nat, size, k):
    """dst = sum of k float32 inputs (what every all-reduce step does)."""
    srcs = [_f32(SIZES[size], q) for q in range(k)]
    dst = np.empty_like(srcs[0])
    addrs = [native.addr(s) for s in srcs]
    nat.reduce(native.addr(dst), addrs, dst.size, dt.F32, dt.SUM)
    want = srcs[0].copy()
    for s in srcs[1:]:
        want += s
    assert np.array_equal(dst, want)
    timed((k + 1) * SIZES[size], nat.reduce, native.addr(dst), addrs, dst.size, dt.F32, dt.SUM)


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("size", SIZES)
def test_reduce_f32_numpy(timed, size, k):
    srcs = [_f32(SIZES[size], q) for q in range(k)]
    dst = np.empty_like(srcs[0])

    def fold():
        np.add(srcs[0], srcs[1], out=dst)
        for s in srcs[2:]:
            np.add(dst, s, out=dst)
    timed((k + 1) * SIZES[size], fold)


@pytest.mark.parametrize("size", SIZES)
def test_reduce_bf16_c(timed, nat, size):
    """bfloat16 sum of two inputs, accumulated in float32, rounded once."""
    torch = pytest.importorskip("torch")
    a = torch.from_numpy(_f32(2 * SIZES[size], 1)).to(torch.bfloat16)
    b = torch.from_numpy(_f32(2 * SIZES[size], 2)).to(torch.bfloat16)
    dst = torch.empty_like(a)
    addrs = [a.data_ptr(), b.data_ptr()]
    nat.reduce(dst.data_ptr(), addrs, a.numel(), dt.BF16, dt.SUM)
    assert torch.equal(dst, (a.float() + b.float()).to(torch.bfloat16))
    timed(3 * SIZES[size], nat.reduce, dst.data_ptr(), addrs, a.numel(), dt.BF16, dt.SUM)


@pytest.mark.parametrize("size", SIZES)
def test_reduce_bf16_torch(timed, size):
    torch = pytest.importorskip("torch")
    a = torch.from_numpy(_f32(2 * SIZES[size], 1)).to(torch.bfloat16)
    b = torch.from_numpy(_f32(2 * SIZES[size], 2)).to(torch.bfloat16)
    dst = torch.empty_like(a)
    timed(3 * SIZES[size], lambda: torch.add(a, b, out=dst))


def _moe_case(rows=4096, hidden=1024, fanout=2, seed=0):
    """float32 token rows, a random routing of `fanout` entries per output row."""
    rng = np.random.default_rng(seed)
    src = rng.standard_normal((rows, hidden)).astype(np.float32)
    idx = rng.integers(0, rows, rows * fanout).astype(np.int64)
    w = rng.random(rows * fanout).astype(np.float32)
    offsets = np.arange(0, rows * fanout + 1, fanout, dtype=np.int64)
    return src, idx, w, offsets


def test_moe_gather_rows_c(timed, nat):
    src, idx, _, _ = _moe_case()
    dst = np.empty((idx.size, src.shape[1]), np.float32)
    nat.moe_gather_rows(native.addr(dst), native.addr(src), native.addr(idx), idx.size,
                        src.shape[1] * 4)
    assert np.array_equal(dst, src[idx])
    timed(2 * dst.nbytes, nat.moe_gather_rows, native.addr(dst), native.addr(src),
          native.addr(idx), idx.size, src.shape[1] * 4)


def test_moe_gather_rows_numpy(timed):
    src, idx, _, _ = _moe_case()
    dst = np.empty((idx.size, src.shape[1]), np.float32)
    timed(2 * dst.nbytes, np.take, src, idx, 0, dst)


def test_moe_weighted_combine_c(timed, nat):
    """out[j] = sum of w[e] * src[idx[e]] over j's entries (combine's fold)."""
    src, idx, w, offsets = _moe_case()
    out = np.empty((offsets.size - 1, src.shape[1]), np.float32)
    args = (native.addr(out), out.shape[0], native.addr(offsets), native.addr(idx),
            native.addr(w), native.addr(src), 1 << 62, 0, src.shape[1], dt.F32)
    nat.moe_reduce_rows(*args)
    want = np.empty_like(out)
    ref_moe.moe_reduce_rows(native.addr(want), *args[1:])
    assert np.array_equal(out, want)
    timed(idx.size * src.shape[1] * 4 + out.nbytes, nat.moe_reduce_rows, *args)


def test_moe_weighted_combine_torch(timed):
    """The same fold as torch users write it: index_add_ of weighted rows."""
    torch = pytest.importorskip("torch")
    src, idx, w, offsets = _moe_case()
    s, ix, wt = torch.from_numpy(src), torch.from_numpy(idx), torch.from_numpy(w)
    dest = torch.from_numpy(np.repeat(np.arange(offsets.size - 1), np.diff(offsets)))
    out = torch.empty((offsets.size - 1, src.shape[1]))

    def fold():
        out.zero_()
        out.index_add_(0, dest, s[ix] * wt[:, None])
    timed(idx.size * src.shape[1] * 4 + out.numel() * 4, fold)
