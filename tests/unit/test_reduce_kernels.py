"""Reduction / scale / copy kernels: comms.kernels.reference_ops (numpy) against independent
expectations, and the C helpers (comms.kernels._native, when built) bit for bit against the
fallback. NaNs compare equal to NaNs (payloads may differ); everything else bitwise."""
from __future__ import annotations

import ctypes
import functools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from comms.kernels import reference_ops as fb
from comms.core.dtypes import (AVG, BAND, BF16, BOOL, BOR, BXOR, DTYPE_SIZES, F16, F32, F64, I8, I32,
                          I64, MAX, MIN, PROD, SUM, U8)

try:
    import torch
except Exception:  # pragma: no cover - torch is optional
    torch = None

try:
    from comms.kernels import _native as native
except Exception:  # not built: the native tests skip
    native = None

needs_native = pytest.mark.skipif(native is None, reason="comms.kernels._native not built")
needs_torch = pytest.mark.skipif(torch is None, reason="torch not installed")

ALL_DTYPES = [F16, BF16, F32, F64, I8, U8, I32, I64, BOOL]
FLOATS = [F16, BF16, F32, F64]
INTS = [I8, U8, I32, I64]
ALL_OPS = [SUM, PROD, MIN, MAX, BAND, BOR, BXOR]
SUPPORTED = [(d, o) for d in ALL_DTYPES for o in ALL_OPS if o not in (BAND, BOR, BXOR)
             or d not in FLOATS]
UNSUPPORTED = [(d, o) for d in FLOATS for o in (BAND, BOR, BXOR)]
HSETTINGS = settings(max_examples=60, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------- helpers

def sdt(dtype):
    return fb.storage_dtype(dtype)


def as_float(x, dtype):
    """float view of storage-dtype data (for NaN tests)."""
    x = np.asarray(x).view(sdt(dtype))
    return fb.bf16_to_f32(x) if dtype == BF16 else x


def assert_same(x, y, dtype, what=""):
    """bitwise equal, except that any NaN equals any NaN."""
    x = np.ascontiguousarray(x).view(sdt(dtype)).reshape(-1)
    y = np.ascontiguousarray(y).view(sdt(dtype)).reshape(-1)
    assert x.shape == y.shape, what
    if x.size == 0:
        return
    eq = (x.view(np.uint8).reshape(x.size, -1) == y.view(np.uint8).reshape(y.size, -1)).all(1)
    if dtype in FLOATS:
        eq |= np.isnan(as_float(x, dtype)) & np.isnan(as_float(y, dtype))
    if not eq.all():
        i = int(np.nonzero(~eq)[0][0])
        raise AssertionError(f"{what}: {int((~eq).sum())} of {x.size} differ; first at {i}: "
                             f"{x[i]!r} vs {y[i]!r}")


SPECIAL_F32 = np.array([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, -np.nan, 1e-45, -1e-45,
                        1.17e-38, 3.4e38, -3.4e38, 65504.0, 65520.0, 6e-8, 6.1e-5, 1.0009765625,
                        1.00390625, 2.0 ** -133, 0.5, 3.0], np.float32)


def rand_raw(rng, dtype, n):
    """n elements of dtype as raw bytes: for floats a mix of ordinary values (which make
    rounding matter), special values and random bit patterns (NaNs, infs, subnormals)."""
    size = DTYPE_SIZES[dtype]
    raw = rng.integers(0, 256, size=n * size, dtype=np.uint8)
    if dtype in FLOATS:
        vals = (rng.standard_normal(n) * rng.choice([1e-6, 1.0, 300.0], n)).astype(np.float32)
        k = rng.random(n)
        vals = np.where(k < 0.1, rng.choice(SPECIAL_F32, n), vals).astype(np.float32)
        if dtype == F16:
            with np.errstate(over="ignore"):
                nice = vals.astype(np.float16)
        elif dtype == BF16:
            nice = fb.f32_to_bf16(vals)
        elif dtype == F32:
            nice = vals
        else:
            nice = np.where(k < 0.1, vals.astype(np.float64), rng.standard_normal(n) * 7.0)
        keep = np.repeat(k < 0.85, size)
        raw = np.where(keep, nice.view(np.uint8), raw)
    elif dtype == BOOL:
        raw = np.where(rng.random(n) < 0.5, 0, raw).astype(np.uint8)
    elif dtype in (I8, U8, I32, I64):
        small = rng.integers(-3, 4, size=n).astype(sdt(dtype)).view(np.uint8)
        raw = np.where(np.repeat(rng.random(n) < 0.3, size), small, raw)
    return raw


class Buf:
    """count elements of raw data at a chosen byte offset inside a larger buffer."""

    def __init__(self, raw, offset):
        self.mem = np.zeros(raw.size + offset + 64, np.uint8)
        self.mem[offset:offset + raw.size] = raw
        self.offset, self.nbytes = offset, raw.size
        self.addr = self.mem.ctypes.data + offset

    @property
    def data(self):
        return self.mem[self.offset:self.offset + self.nbytes].copy()

    def guard_ok(self, fill=0):
        return (self.mem[:self.offset] == fill).all() and \
            (self.mem[self.offset + self.nbytes:] == fill).all()


def fold_np(arrays, f):
    return functools.reduce(f, arrays[1:], arrays[0])


# ----------------------------------------------------------------------------- fallback: floats

@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("op", [SUM, PROD])
def test_fallback_float_sum_prod_is_numpy_left_fold(dtype, op):
    rng = np.random.default_rng(1)
    for nsrc in (1, 2, 3, 5, 8):
        arrs = [rand_raw(rng, dtype, 301).view(sdt(dtype)) for _ in range(nsrc)]
        with np.errstate(all="ignore"):
            want = fold_np(arrs, np.add if op == SUM else np.multiply)
        assert_same(fb.reduce_arrays(arrs, op, dtype), want, dtype, f"nsrc={nsrc}")


@pytest.mark.parametrize("dtype", [F16, F32, F64])
@pytest.mark.parametrize("op", [MIN, MAX])
def test_fallback_float_min_max_matches_numpy(dtype, op):
    rng = np.random.default_rng(2)
    for nsrc in (1, 2, 4, 7):
        arrs = [rand_raw(rng, dtype, 257).view(sdt(dtype)) for _ in range(nsrc)]
        want = fold_np(arrs, np.minimum if op == MIN else np.maximum)
        got = fb.reduce_arrays(arrs, op, dtype)
        # numpy does not pin which zero wins for min(+0, -0): compare values, NaN == NaN
        assert np.array_equal(got, want, equal_nan=True)


def test_fallback_min_max_nan_and_zero_rules():
    nan, inf = np.float32(np.nan), np.float32(np.inf)
    a = np.array([nan, 1.0, nan, 0.0, -0.0, -inf], np.float32)
    b = np.array([1.0, nan, nan, -0.0, 0.0, inf], np.float32)
    mn = fb.reduce_arrays([a, b], MIN, F32)
    mx = fb.reduce_arrays([a, b], MAX, F32)
    assert np.isnan(mn[:3]).all() and np.isnan(mx[:3]).all()
    # ties (equal values, e.g. +0 and -0) take the later source
    assert mn[3:].tobytes() == np.array([-0.0, 0.0, -inf], np.float32).tobytes()
    assert mx[3:].tobytes() == np.array([-0.0, 0.0, inf], np.float32).tobytes()


@pytest.mark.parametrize("op", [SUM, PROD])
def test_fallback_f16_matches_numpy_float16_arithmetic(op):
    rng = np.random.default_rng(3)
    for nsrc in (2, 3, 8):
        arrs = [rand_raw(rng, F16, 1001).view(np.float16) for _ in range(nsrc)]
        with np.errstate(all="ignore"):
            want = fold_np(arrs, np.add if op == SUM else np.multiply)  # rounds every step
        assert_same(fb.reduce_arrays(arrs, op, F16), want, F16, f"nsrc={nsrc}")


def test_f16_rounding_is_per_step():
    # 2048 + 1 + 1 in float16: each +1 is a tie that rounds back to 2048 (even)
    arrs = [np.array([2048.0], np.float16), np.array([1.0], np.float16),
            np.array([1.0], np.float16)]
    assert fb.reduce_arrays(arrs, SUM, F16)[0] == 2048.0
    assert fb.reduce_arrays(arrs[::-1], SUM, F16)[0] == 2050.0


def _bf16_value(p):
    """float64 value of bfloat16 bit pattern p; exponent 255 with mantissa 0 reads as
    2**128 (the rounding target one step above the largest finite value)."""
    sign = -1.0 if p & 0x8000 else 1.0
    e, m = (p >> 7) & 0xFF, p & 0x7F
    if e == 0:
        return sign * m * 2.0 ** -133
    return sign * (1 + m / 128.0) * 2.0 ** (e - 127)


def _bf16_reference(x):
    """independent RNE float32 -> bfloat16 using exact float64 comparisons."""
    out = np.empty(x.size, np.uint16)
    for i, v in enumerate(x.astype(np.float32)):
        bits = int(np.float32(v).view(np.uint32))
        lo = bits >> 16
        if np.isnan(v):
            out[i] = 0x7FC0
        elif lo << 16 == bits:
            out[i] = lo
        else:
            exact, hi = float(v), lo + 1  # hi: next magnitude away from zero
            dlo, dhi = abs(exact - _bf16_value(lo)), abs(_bf16_value(hi) - exact)
            out[i] = lo if (dlo < dhi or (dlo == dhi and lo % 2 == 0)) else hi
    return out


def test_f32_to_bf16_rounding_reference():
    rng = np.random.default_rng(4)
    bits = rng.integers(0, 2 ** 32, size=3000, dtype=np.uint64).astype(np.uint32)
    # ties and near-ties in the low 16 bits, both parities, and the overflow edge
    ties = (rng.integers(0, 2 ** 16, size=500, dtype=np.uint32) << 16) | np.uint32(0x8000)
    edge = np.array([0x7F7F8000, 0x7F7F7FFF, 0xFF7F8000, 0x00008000, 0x00018000, 0x80008000,
                     0x3F808000, 0x3F818000], np.uint32)
    x = np.concatenate([bits, ties, edge]).view(np.float32)
    x = np.concatenate([x, SPECIAL_F32])
    got = fb.f32_to_bf16(x)
    want = _bf16_reference(x)
    assert_same(got, want, BF16)
    # NaN stays NaN (quiet), and the round trip to float32 is exact
    assert np.isnan(fb.bf16_to_f32(got)[np.isnan(x)]).all()
    y = fb.bf16_to_f32(want)
    ok = np.isnan(x) | (fb.f32_to_bf16(y) == want)
    assert ok.all()


@needs_torch
def test_bf16_conversions_match_torch():
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.integers(0, 2 ** 32, size=20000, dtype=np.uint64)
                        .astype(np.uint32).view(np.float32), SPECIAL_F32])
    tb = torch.from_numpy(x.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert_same(fb.f32_to_bf16(x), tb, BF16)
    back = torch.from_numpy(tb.view(np.int16).copy()).view(torch.bfloat16).float().numpy()
    assert_same(fb.bf16_to_f32(tb), back, F32)


@needs_torch
@pytest.mark.parametrize("op", [SUM, PROD, MIN, MAX])
def test_fallback_bf16_matches_torch(op):
    rng = np.random.default_rng(6)
    f = {SUM: torch.add, PROD: torch.mul, MIN: torch.minimum, MAX: torch.maximum}[op]
    for nsrc in (1, 2, 3, 8):
        arrs = [rand_raw(rng, BF16, 2003).view(np.uint16) for _ in range(nsrc)]
        ts = [torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16) for a in arrs]
        want = functools.reduce(f, ts[1:], ts[0]).view(torch.int16).numpy().view(np.uint16)
        got = fb.reduce_arrays(arrs, op, BF16)
        if op in (MIN, MAX):  # which zero wins a tie is not pinned by torch
            assert np.array_equal(fb.bf16_to_f32(got), fb.bf16_to_f32(want), equal_nan=True)
        else:
            assert_same(got, want, BF16, f"nsrc={nsrc}")


# ----------------------------------------------------------------------------- fallback: ints, bool

def _int_info(dtype):
    return {I8: (8, True), U8: (8, False), I32: (32, True), I64: (64, True)}[dtype]


def _wrap(v, dtype):
    bits, signed = _int_info(dtype)
    v &= (1 << bits) - 1
    if signed and v >= 1 << (bits - 1):
        v -= 1 << bits
    return v


@HSETTINGS
@given(dtype=st.sampled_from(INTS), op=st.sampled_from([SUM, PROD, MIN, MAX, BAND, BOR, BXOR]),
       data=st.data())
def test_fallback_ints_match_python_ints(dtype, op, data):
    bits, signed = _int_info(dtype)
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    nsrc = data.draw(st.integers(1, 6))
    n = data.draw(st.integers(0, 12))
    rows = [data.draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n))
            for _ in range(nsrc)]
    f = {SUM: lambda a, b: a + b, PROD: lambda a, b: a * b, MIN: min, MAX: max,
         BAND: lambda a, b: a & b, BOR: lambda a, b: a | b, BXOR: lambda a, b: a ^ b}[op]
    want = [_wrap(functools.reduce(f, col), dtype) for col in zip(*rows)]
    arrs = [np.array(r, dtype=sdt(dtype)).reshape(n) for r in rows]
    got = fb.reduce_arrays(arrs, op, dtype)
    assert got.dtype == sdt(dtype)
    assert got.tolist() == want


@HSETTINGS
@given(op=st.sampled_from(ALL_OPS), data=st.data())
def test_fallback_bool_any_nonzero_byte_is_true(op, data):
    nsrc = data.draw(st.integers(1, 6))
    n = data.draw(st.integers(0, 16))
    rows = [data.draw(st.lists(st.sampled_from([0, 1, 2, 255, 128]), min_size=n, max_size=n))
            for _ in range(nsrc)]
    truth = [[v != 0 for v in r] for r in rows]
    f = {SUM: any, MAX: any, BOR: any, PROD: all, MIN: all, BAND: all,
         BXOR: lambda col: sum(col) % 2 == 1}[op]
    want = [f(col) for col in zip(*truth)] if n else []
    arrs = [np.array(r, np.uint8).reshape(n) for r in rows]
    got = fb.reduce_arrays(arrs, op, BOOL)
    assert got.dtype == np.bool_ and got.tolist() == want
    # on raw addresses the output bytes are exactly 0/1
    if n:
        bufs = [Buf(a, 0) for a in arrs]
        out = Buf(np.full(n, 7, np.uint8), 0)
        fb.reduce(out.addr, [b.addr for b in bufs], n, BOOL, op)
        assert out.data.tolist() == [int(w) for w in want]


# ----------------------------------------------------------------------------- fallback: addresses

@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_fallback_reduce_on_addresses(dtype):
    rng = np.random.default_rng(7)
    op = SUM
    for count, nsrc, off in [(0, 2, 0), (1, 1, 0), (37, 3, 1), (70001, 4, 3)]:
        raws = [rand_raw(rng, dtype, count) for _ in range(nsrc)]
        want = fb.reduce_arrays([r.view(sdt(dtype)) for r in raws], op, dtype)
        bufs = [Buf(r, off) for r in raws]
        d1, d2 = Buf(np.zeros(count * DTYPE_SIZES[dtype], np.uint8), off), \
            Buf(np.zeros(count * DTYPE_SIZES[dtype], np.uint8), off)
        fb.reduce2(d1.addr, d2.addr, [b.addr for b in bufs], count, dtype, op)
        assert_same(d1.data, want.view(np.uint8), dtype)
        assert_same(d2.data, want.view(np.uint8), dtype)
        assert d1.guard_ok() and d2.guard_ok()
        # dst aliasing the last source
        fb.reduce(bufs[-1].addr, [b.addr for b in bufs], count, dtype, op)
        assert_same(bufs[-1].data, want.view(np.uint8), dtype)


@pytest.mark.parametrize("dtype", FLOATS)
def test_fallback_scale(dtype):
    rng = np.random.default_rng(8)
    factor = 1.0 / 3.0
    x = rand_raw(rng, dtype, 5003).view(sdt(dtype))
    with np.errstate(all="ignore"):
        f32 = np.float64(np.float32(factor))
        if dtype == F64:
            want = x * factor
        elif dtype == F32:  # the float64 product of two floats is exact: one rounding
            want = (x.astype(np.float64) * f32).astype(np.float32)
        elif dtype == F16:
            want = (x.astype(np.float64) * f32).astype(np.float32).astype(np.float16)
        else:
            want = fb.f32_to_bf16((fb.bf16_to_f32(x).astype(np.float64) * f32).astype(np.float32))
    b = Buf(x.view(np.uint8), 0)
    out = Buf(np.zeros(x.nbytes, np.uint8), 0)
    fb.scale(out.addr, b.addr, x.size, dtype, factor)
    assert_same(out.data, want.view(np.uint8), dtype)
    fb.scale(b.addr, b.addr, x.size, dtype, factor)  # in place
    assert_same(b.data, want.view(np.uint8), dtype)
    if dtype == BF16 and torch is not None:
        t = torch.from_numpy(x.view(np.int16).copy()).view(torch.bfloat16)
        tw = (t.float() * float(np.float32(factor))).bfloat16().view(torch.int16).numpy()
        assert_same(out.data, tw.view(np.uint8), BF16)


def test_fallback_copy():
    rng = np.random.default_rng(9)
    for n, skew in [(0, 0), (1, 3), (4096, 16), (100001, 16)]:
        src = Buf(rng.integers(0, 256, n, dtype=np.uint8), 0)
        dst = Buf(np.zeros(n, np.uint8), skew)
        fb.copy(dst.addr, src.addr, n)
        assert np.array_equal(dst.data, src.data) and dst.guard_ok()


def test_fallback_unsupported_raise():
    a = np.zeros(4, np.float32)
    for dtype, op in UNSUPPORTED:
        assert not fb.op_supported(dtype, op)
        with pytest.raises(ValueError):
            fb.reduce(a.ctypes.data, [a.ctypes.data], 1, dtype, op)
        with pytest.raises(ValueError):
            fb.reduce_arrays([a.view(sdt(dtype))[:1]], op, dtype)
    for dtype, op in [(99, SUM), (-1, SUM), (F32, AVG), (F32, 7), (I32, -1)]:
        with pytest.raises(ValueError):
            fb.reduce(a.ctypes.data, [a.ctypes.data], 1, dtype, op)
    for dtype in INTS + [BOOL, 42]:
        with pytest.raises(ValueError):
            fb.scale(a.ctypes.data, a.ctypes.data, 1, dtype, 0.5)
    with pytest.raises(ValueError):
        fb.reduce(a.ctypes.data, [], 1, F32, SUM)


# ----------------------------------------------------------------------------- native vs fallback

COUNTS = [0, 1, 2, 7, 31, 1031, 8209]
BIG = 100003


@needs_native
@pytest.mark.parametrize("dtype,op", SUPPORTED)
def test_native_reduce_bit_identical(dtype, op):
    rng = np.random.default_rng(1000 + 10 * dtype + op)
    size = DTYPE_SIZES[dtype]
    cases = [(nsrc, c) for nsrc in range(1, 9) for c in COUNTS]
    cases += [(nsrc, BIG) for nsrc in (1, 2, 3, 8)]
    for nsrc, count in cases:
        # element offsets misalign vectors; odd byte offsets misalign elements
        off = int(rng.choice([0, size, 1, 3])) if size > 1 else int(rng.choice([0, 1, 5]))
        raws = [rand_raw(rng, dtype, count) for _ in range(nsrc)]
        what = f"nsrc={nsrc} count={count} off={off}"
        bufs = [Buf(r, off) for r in raws]
        fbufs = [Buf(r, off) for r in raws]
        zero = np.zeros(count * size, np.uint8)
        d, d2, fd = Buf(zero, off), Buf(zero, (off + 8) % 16), Buf(zero, off)
        native.reduce2(d.addr, d2.addr, [b.addr for b in bufs], count, dtype, op)
        fb.reduce(fd.addr, [b.addr for b in fbufs], count, dtype, op)
        assert_same(d.data, fd.data, dtype, what)
        assert_same(d2.data, fd.data, dtype, what + " (dst2)")
        assert d.guard_ok() and d2.guard_ok(), what
        for b, r in zip(bufs, raws):  # sources untouched
            assert np.array_equal(b.data, r), what
        # aliasing: dst == srcs[0] and dst == srcs[k]
        for k in sorted({0, int(rng.integers(0, nsrc))}):
            ab = [Buf(r, off) for r in raws]
            native.reduce(ab[k].addr, [b.addr for b in ab], count, dtype, op)
            assert_same(ab[k].data, fd.data, dtype, what + f" (dst=srcs[{k}])")
            assert ab[k].guard_ok(), what


@needs_native
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_native_reduce2_without_second_destination(dtype):
    rng = np.random.default_rng(11)
    count, op = 4099, MAX
    raws = [rand_raw(rng, dtype, count) for _ in range(3)]
    bufs = [Buf(r, 0) for r in raws]
    d, fd = Buf(np.zeros(count * DTYPE_SIZES[dtype], np.uint8), 0), \
        Buf(np.zeros(count * DTYPE_SIZES[dtype], np.uint8), 0)
    native.reduce2(d.addr, 0, [b.addr for b in bufs], count, dtype, op)
    fb.reduce2(fd.addr, 0, [b.addr for b in bufs], count, dtype, op)
    assert_same(d.data, fd.data, dtype)
    native.reduce2(d.addr, d.addr, [b.addr for b in bufs], count, dtype, op)  # dst2 == dst
    assert_same(d.data, fd.data, dtype)


@needs_native
def test_native_matches_numpy_reference_directly():
    # the fallback is itself checked above; this pins native to plain numpy float16 too
    rng = np.random.default_rng(12)
    arrs = [rand_raw(rng, F16, 3001).view(np.float16) for _ in range(4)]
    with np.errstate(all="ignore"):
        want = fold_np(arrs, np.add)
    bufs = [Buf(a.view(np.uint8), 0) for a in arrs]
    d = Buf(np.zeros(arrs[0].nbytes, np.uint8), 0)
    native.reduce(d.addr, [b.addr for b in bufs], 3001, F16, SUM)
    assert_same(d.data, want.view(np.uint8), F16)


@needs_native
@pytest.mark.parametrize("dtype", FLOATS)
def test_native_scale_bit_identical(dtype):
    rng = np.random.default_rng(13)
    size = DTYPE_SIZES[dtype]
    for count, off in [(0, 0), (1, 0), (15, 1), (8195, size), (BIG, 3)]:
        for factor in (1.0 / 3.0, 0.125, 1.0 / 7.0, -2.5):
            raw = rand_raw(rng, dtype, count)
            a, b, c = Buf(raw, off), Buf(raw, off), Buf(np.zeros_like(raw), off)
            native.scale(c.addr, a.addr, count, dtype, factor)
            fb.scale(b.addr, b.addr, count, dtype, factor)
            assert_same(c.data, b.data, dtype, f"count={count} factor={factor}")
            native.scale(a.addr, a.addr, count, dtype, factor)  # in place
            assert_same(a.data, b.data, dtype, f"in place count={count}")
            assert a.guard_ok() and c.guard_ok()


@needs_native
def test_native_scale_rejects_non_float():
    a = np.zeros(8, np.int64)
    for dtype in INTS + [BOOL, 77]:
        with pytest.raises(ValueError):
            native.scale(a.ctypes.data, a.ctypes.data, 8, dtype, 0.5)


@needs_native
def test_native_copy():
    rng = np.random.default_rng(14)
    sizes = [0, 1, 31, 2047, 2048, 2049, 4096 + 17, 65536, 300007]
    for n in sizes:
        for skew in (0, 1, 16, 31, 32, 4080):
            src = Buf(rng.integers(0, 256, n, dtype=np.uint8), (skew * 7) % 64)
            dst = Buf(np.zeros(n, np.uint8), ((skew * 7) % 64 + skew) % 4096)
            native.copy(dst.addr, src.addr, n)
            assert np.array_equal(dst.data, src.data), (n, skew)
            assert dst.guard_ok(), (n, skew)
    # large enough for the streaming path (half the last-level cache or more)
    n = (48 << 20) + 13
    src = np.frombuffer(rng.bytes(n), np.uint8)
    dst = np.zeros(n + 64, np.uint8)
    native.copy(dst.ctypes.data + 16, src.ctypes.data, n)
    assert np.array_equal(dst[16:16 + n], src)
    assert not dst[:16].any() and not dst[16 + n:].any()


@needs_native
def test_native_unsupported_raise():
    a = np.zeros(4, np.float32)
    for dtype, op in UNSUPPORTED + [(99, SUM), (F32, AVG), (F32, 7), (-1, SUM)]:
        with pytest.raises(ValueError):
            native.reduce(a.ctypes.data, [a.ctypes.data], 1, dtype, op)
        with pytest.raises(ValueError):
            native.reduce2(a.ctypes.data, 0, [a.ctypes.data], 1, dtype, op)


def _c_library():
    """the extension as a plain shared library, for the raw C ABI (tc_* symbols)."""
    path = getattr(native, "__file__", "") or ""
    if not path.endswith((".so", ".pyd", ".dylib")):
        pytest.skip("comms.kernels._native is not a shared library")
    lib = ctypes.CDLL(path)
    try:
        lib.tc_op_supported
    except AttributeError:
        pytest.skip("tc_* symbols not exported")
    lib.tc_dtype_size.restype = ctypes.c_size_t
    lib.tc_reduce.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int,
                              ctypes.c_size_t, ctypes.c_int, ctypes.c_int]
    lib.tc_scale.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                             ctypes.c_double]
    return lib


@needs_native
def test_c_abi_codes():
    lib = _c_library()
    for d in ALL_DTYPES:
        assert lib.tc_dtype_size(d) == DTYPE_SIZES[d]
        for o in ALL_OPS:
            assert lib.tc_op_supported(d, o) == int((d, o) in SUPPORTED)
    assert lib.tc_dtype_size(9) == 0 and lib.tc_op_supported(9, SUM) == 0
    assert lib.tc_op_supported(F32, 7) == 0 and lib.tc_op_supported(F32, -1) == 0
    a = np.ones(4, np.float32)
    srcs = (ctypes.c_void_p * 1)(a.ctypes.data)
    assert lib.tc_reduce(a.ctypes.data, srcs, 1, 4, F32, BAND) == -1
    assert lib.tc_reduce(a.ctypes.data, srcs, 0, 4, F32, SUM) == -1
    assert lib.tc_reduce(a.ctypes.data, srcs, 1, 4, F32, SUM) == 0
    assert lib.tc_scale(a.ctypes.data, a.ctypes.data, 4, I32, 0.5) == -1
    assert lib.tc_scale(a.ctypes.data, a.ctypes.data, 4, F32, 0.5) == 0
    assert a.tolist() == [0.5] * 4
