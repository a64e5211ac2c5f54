"""numpy twins of the MoE row kernels of native/src/moe.c: same signatures (raw addresses),
bit-identical results. comms.kernels.reference re-exports them, so `comms.kernels.native.impl()` has them in
both modes. The semantics are documented at the top of native/src/moe.c.

Imports nothing from comms beyond the dtype codes (comms.kernels.reference imports this module).
"""
from __future__ import annotations

import ctypes

import numpy as np

from comms.core.dtypes import BF16, F32, F64

_STORE = {F32: np.dtype(np.float32), F64: np.dtype(np.float64), BF16: np.dtype(np.uint16)}
_ACC = {F32: np.dtype(np.float32), F64: np.dtype(np.float64), BF16: np.dtype(np.float32)}


def _dtype_ok(dtype):
    if dtype not in _STORE:
        raise ValueError(f"dtype: MoE kernels handle float32, float64 and bfloat16, got code {dtype}")


def _view(addr, count, dtype):
    """numpy view of `count` elements of `dtype` at addr (empty for count 0)."""
    dtype = np.dtype(dtype)
    if count <= 0:
        return np.empty(0, dtype)
    buf = (ctypes.c_char * (count * dtype.itemsize)).from_address(addr)
    return np.frombuffer(buf, dtype=dtype)


def _to_acc(rows, dtype):
    if dtype == BF16:
        return (rows.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return rows


def _from_acc(values, dtype):
    if dtype != BF16:
        return values
    x = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    nan = (x & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    r = (x + (np.uint32(0x7FFF) + ((x >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    q = (x >> np.uint32(16)) | np.uint32(0x40)
    return np.where(nan, q, r).astype(np.uint16)


def moe_gather_rows(dst, src, idx, n, row_bytes):
    """dst[i] = src[idx[i]] for i < n; rows of row_bytes bytes."""
    if n < 0 or row_bytes < 0:
        raise ValueError("n, row_bytes: must be >= 0")
    if not n or not row_bytes:
        return
    ix = _view(idx, n, np.int64)
    nsrc = int(ix.max()) + 1
    s = _view(src, nsrc * row_bytes, np.uint8).reshape(nsrc, row_bytes)
    d = _view(dst, n * row_bytes, np.uint8).reshape(n, row_bytes)
    np.take(s, ix, axis=0, out=d)


def _rows(src_a, split, src_b, rows, hidden, dtype):
    """Rows `rows` of the virtual concatenation [src_a[:split]; src_b], storage dtype."""
    st = _STORE[dtype]
    out = np.empty((rows.size, hidden), st)
    in_a = rows < split
    if in_a.any():
        ra = rows[in_a]
        a = _view(src_a, (int(ra.max()) + 1) * hidden, st).reshape(-1, hidden)
        out[in_a] = a[ra]
    if not in_a.all():
        rb = rows[~in_a] - split
        b = _view(src_b, (int(rb.max()) + 1) * hidden, st).reshape(-1, hidden)
        out[~in_a] = b[rb]
    return out


def moe_reduce_rows(out, n_out, offsets, entries, weights, src_a, split, src_b, hidden, dtype):
    """out[j] = fold over e in [offsets[j], offsets[j+1]) of w[e] * row(entries[e])."""
    _dtype_ok(dtype)
    if n_out < 0 or hidden < 0:
        raise ValueError("n_out, hidden: must be >= 0")
    if not n_out or not hidden:
        return
    off = _view(offsets, n_out + 1, np.int64)
    n_ent = int(off[-1])
    ent = _view(entries, n_ent, np.int64)
    w = _view(weights, n_ent, np.float32) if weights else None
    acc_t = _ACC[dtype]
    acc = np.zeros((n_out, hidden), acc_t)
    cnt = np.diff(off)
    for s in range(int(cnt.max()) if n_out else 0):
        sel = np.flatnonzero(cnt > s)
        e = off[:-1][sel] + s
        y = _to_acc(_rows(src_a, split, src_b, ent[e], hidden, dtype), dtype)
        if w is not None:
            y = w[e].astype(acc_t)[:, None] * y
        acc[sel] = acc[sel] + y
    o = _view(out, n_out * hidden, _STORE[dtype]).reshape(n_out, hidden)
    o[...] = _from_acc(acc, dtype)


def moe_row_dot(out, n, src_a, idx_a, src_b, idx_b, hidden, dtype):
    """out[i] = float32(sum_h a[h] * b[h]), float64 in 8 lanes (h % 8), lanes added in order."""
    _dtype_ok(dtype)
    if n <= 0:
        return
    o = _view(out, n, np.float32)
    if hidden <= 0:
        o[...] = 0
        return

    def rows(src, idx):
        ix = _view(idx, n, np.int64) if idx else np.arange(n, dtype=np.int64)
        return _to_acc(_rows(src, 1 << 62, 0, ix, hidden, dtype), dtype).astype(np.float64)

    a, b = rows(src_a, idx_a), rows(src_b, idx_b)
    lanes = np.zeros((n, 8), np.float64)
    full = hidden // 8 * 8
    for h in range(0, full, 8):
        lanes = lanes + a[:, h:h + 8] * b[:, h:h + 8]
    tail = hidden - full
    if tail:
        lanes[:, :tail] = lanes[:, :tail] + a[:, full:] * b[:, full:]
    t = lanes[:, 0]
    for lane in range(1, 8):
        t = t + lanes[:, lane]
    o[...] = t.astype(np.float32)
