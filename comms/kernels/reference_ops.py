"""numpy implementation of the reduction / scale / copy helpers of native/src/reduce.c.

Works on raw addresses like the C ABI (native/include/topocomm.h) and gives
bit-identical results (NaNs: both sides give a NaN; payloads may differ):

- left fold in source order: dst = ((s0 op s1) op s2) ...
- float16 / bfloat16: each step widens to float32, applies the op, rounds back to
  16 bits (round to nearest even, NaN stays NaN). bfloat16 travels as uint16 bits.
- min/max propagate NaN: min(a, b) = a if (a < b or a is NaN) else b (same for max
  with >), which also fixes which zero wins for min(+0, -0).
- integer sum/prod wrap; bool: nonzero is true, results are 0/1; sum/max/bor = or,
  prod/min/band = and, bxor = xor.

`reduce_arrays` is the same fold over plain numpy arrays, the reference other tests use.
"""
from __future__ import annotations

import ctypes

import numpy as np

from comms.core import dtypes as _dtypes
from comms.core.dtypes import (AVG, BAND, BF16, BOOL, BOR, BXOR, DTYPE_NAMES, F16, F32, F64, I8, I32, I64,
                     MAX, MIN, OP_NAMES, PROD, SUM, U8)

__all__ = ["reduce", "reduce2", "scale", "copy", "reduce_arrays", "bf16_to_f32", "f32_to_bf16",
           "storage_dtype", "op_supported"]

# how each dtype code is stored in numpy (bfloat16 as its uint16 bits, bool as raw bytes)
_STORAGE = {F16: np.dtype(np.float16), BF16: np.dtype(np.uint16), F32: np.dtype(np.float32),
            F64: np.dtype(np.float64), I8: np.dtype(np.int8), U8: np.dtype(np.uint8),
            I32: np.dtype(np.int32), I64: np.dtype(np.int64), BOOL: np.dtype(np.uint8)}
_UNSIGNED = {I8: np.dtype(np.uint8), U8: np.dtype(np.uint8), I32: np.dtype(np.uint32),
             I64: np.dtype(np.uint64)}
_FLOATS = (F16, BF16, F32, F64)

# elements per chunk in the address-based functions (bounds temporaries, keeps aliasing safe:
# a chunk is read completely before it is written)
_CHUNK = 1 << 18


def storage_dtype(dtype: int) -> np.dtype:
    """numpy dtype holding one element of `dtype` (uint16 for bfloat16, uint8 for bool)."""
    try:
        return _STORAGE[dtype]
    except (KeyError, TypeError):
        raise ValueError(f"dtype: unknown dtype code {dtype!r}") from None


def op_supported(dtype: int, op: int) -> bool:
    """What the kernels do: comms.core.dtypes.op_supported minus AVG (a SUM then a scale)."""
    return dtype in _STORAGE and op != AVG and _dtypes.op_supported(dtype, op)


def _check(dtype: int, op: int) -> None:
    if dtype not in _STORAGE:
        raise ValueError(f"dtype: unknown dtype code {dtype!r}")
    if not op_supported(dtype, op):
        raise ValueError(f"op: {OP_NAMES.get(op, op)!r} is not supported for "
                         f"{DTYPE_NAMES[dtype]}")


# --------------------------------------------------------------------------- bfloat16

def bf16_to_f32(bits) -> np.ndarray:
    """bfloat16 bits (uint16 array) -> float32 array, exact."""
    b = np.asarray(bits)
    if b.dtype != np.uint16:
        b = b.astype(np.uint16)
    return (b.astype(np.uint32) << np.uint32(16)).view(np.float32)


def f32_to_bf16(values) -> np.ndarray:
    """float32 array -> bfloat16 bits (uint16), round to nearest even; NaN -> quiet NaN."""
    x = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    nan = (x & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    r = (x + (np.uint32(0x7FFF) + ((x >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    q = (x >> np.uint32(16)) | np.uint32(0x40)
    return np.where(nan, q, r).astype(np.uint16)


# --------------------------------------------------------------------------- the fold

def _fmin(a, b):
    return np.where((a < b) | np.isnan(a), a, b)


def _fmax(a, b):
    return np.where((a > b) | np.isnan(a), a, b)


_FLOAT_OPS = {SUM: np.add, PROD: np.multiply, MIN: _fmin, MAX: _fmax}


def _fold(arrays, op: int, dtype: int) -> np.ndarray:
    """Left fold over arrays already in storage dtype; returns a new storage-dtype array."""
    n = len(arrays)
    if n < 1:
        raise ValueError("reduce: need at least one source")
    with np.errstate(all="ignore"):
        if dtype == BOOL:
            acc = (arrays[0] != 0).astype(np.uint8)
            f = {SUM: np.bitwise_or, MAX: np.bitwise_or, BOR: np.bitwise_or,
                 PROD: np.bitwise_and, MIN: np.bitwise_and, BAND: np.bitwise_and,
                 BXOR: np.bitwise_xor}[op]
            for b in arrays[1:]:
                acc = f(acc, (b != 0).astype(np.uint8))
            return acc
        if n == 1:
            return np.array(arrays[0], copy=True)
        if dtype in (F32, F64):
            f = _FLOAT_OPS[op]
            acc = f(arrays[0], arrays[1])
            for b in arrays[2:]:
                acc = f(acc, b)
            return acc
        if dtype == F16:
            f = _FLOAT_OPS[op]
            acc = arrays[0]
            for b in arrays[1:]:
                acc = f(acc.astype(np.float32), b.astype(np.float32)).astype(np.float16)
            return acc
        if dtype == BF16:
            f = _FLOAT_OPS[op]
            acc = arrays[0]
            for b in arrays[1:]:
                acc = f32_to_bf16(f(bf16_to_f32(acc), bf16_to_f32(b)))
            return acc
        # integers
        if op in (MIN, MAX):
            f = np.minimum if op == MIN else np.maximum
            sdt = _STORAGE[dtype]
            arrs = [a.view(sdt) for a in arrays]
        else:
            f = {SUM: np.add, PROD: np.multiply, BAND: np.bitwise_and, BOR: np.bitwise_or,
                 BXOR: np.bitwise_xor}[op]
            udt = _UNSIGNED[dtype]
            arrs = [a.view(udt) for a in arrays]
        acc = f(arrs[0], arrs[1])
        for b in arrs[2:]:
            acc = f(acc, b)
        return acc.view(_STORAGE[dtype])


def reduce_arrays(arrays, op_code: int, dtype_code: int) -> np.ndarray:
    """Reference left fold over a list of equal-length numpy arrays.

    Arrays are reinterpreted (not converted) as the storage dtype of `dtype_code`
    (bfloat16 as uint16 bits; bool may be np.bool_ or uint8 bytes). Returns a new array:
    float16, uint16 bits for bfloat16, the integer dtype, or np.bool_ for bool.
    """
    _check(dtype_code, op_code)
    sdt = _STORAGE[dtype_code]
    views = []
    for a in arrays:
        a = np.ascontiguousarray(a).reshape(-1)
        if a.dtype.itemsize != sdt.itemsize:
            raise ValueError(f"reduce_arrays: {a.dtype} array given for "
                             f"{DTYPE_NAMES[dtype_code]}")
        views.append(a.view(sdt))
    if views and any(v.shape != views[0].shape for v in views):
        raise ValueError("reduce_arrays: arrays differ in length")
    out = _fold(views, op_code, dtype_code)
    if dtype_code == BOOL:
        out = out.astype(np.bool_)
    return out


# --------------------------------------------------------------------------- raw addresses

def _view(addr: int, count: int, dt: np.dtype) -> np.ndarray:
    if count == 0:
        return np.empty(0, dt)
    if not addr:
        raise ValueError("null address")
    buf = (ctypes.c_char * (count * dt.itemsize)).from_address(addr)
    return np.frombuffer(buf, dtype=dt)


def reduce2(dst_addr: int, dst2_addr: int, src_addrs, count: int, dtype: int, op: int) -> None:
    """dst (and dst2 unless 0) = left fold of the sources; dst may alias a source."""
    _check(dtype, op)
    src_addrs = list(src_addrs)
    if len(src_addrs) < 1:
        raise ValueError("reduce: need at least one source")
    count = int(count)
    if count < 0:
        raise ValueError("reduce: negative count")
    if count == 0:
        return
    sdt = _STORAGE[dtype]
    srcs = [_view(a, count, sdt) for a in src_addrs]
    dst = _view(dst_addr, count, sdt)
    dst2 = _view(dst2_addr, count, sdt) if dst2_addr and dst2_addr != dst_addr else None
    for lo in range(0, count, _CHUNK):
        hi = min(count, lo + _CHUNK)
        r = _fold([s[lo:hi] for s in srcs], op, dtype)
        dst[lo:hi] = r
        if dst2 is not None:
            dst2[lo:hi] = r


def reduce(dst_addr: int, src_addrs, count: int, dtype: int, op: int) -> None:
    reduce2(dst_addr, 0, src_addrs, count, dtype, op)


def _scale_array(x: np.ndarray, dtype: int, factor: float) -> np.ndarray:
    with np.errstate(all="ignore"):
        if dtype == F32:
            return x * np.float32(factor)
        if dtype == F64:
            return x * np.float64(factor)
        if dtype == F16:
            return (x.astype(np.float32) * np.float32(factor)).astype(np.float16)
        if dtype == BF16:
            return f32_to_bf16(bf16_to_f32(x) * np.float32(factor))
    raise ValueError(f"scale: unsupported dtype {DTYPE_NAMES.get(dtype, dtype)!r} "
                     "(float dtypes only)")


def scale(dst_addr: int, src_addr: int, count: int, dtype: int, factor: float) -> None:
    """dst = src * factor for float dtypes (float32 math for 16-bit types, one rounding)."""
    if dtype not in _FLOATS:
        raise ValueError(f"scale: unsupported dtype {DTYPE_NAMES.get(dtype, dtype)!r} "
                         "(float dtypes only)")
    count = int(count)
    if count <= 0:
        if count < 0:
            raise ValueError("scale: negative count")
        return
    sdt = _STORAGE[dtype]
    src = _view(src_addr, count, sdt)
    dst = _view(dst_addr, count, sdt)
    for lo in range(0, count, _CHUNK):
        hi = min(count, lo + _CHUNK)
        dst[lo:hi] = _scale_array(src[lo:hi], dtype, factor)


def copy(dst_addr: int, src_addr: int, nbytes: int) -> None:
    nbytes = int(nbytes)
    if nbytes < 0:
        raise ValueError("copy: negative size")
    if nbytes and dst_addr != src_addr:
        ctypes.memmove(dst_addr, src_addr, nbytes)
