"""The data steps of dispatch and combine (forward and backward) on numpy storage views.

Arrays here are numpy views of the caller's buffers (torch tensors included): float32,
float64, or bfloat16 as its uint16 bits; `dtype` is the comms.dtypes code. Row kernels are
comms.kernels._native.moe_* (C, GIL released) or their numpy twins (comms/kernels/reference_moe.py).

Bytes per rank, hidden H, element size s, for R received tokens and S tokens sent to peers:
  dispatch   pack S rows, all-to-all S rows out / R - own rows in, copy own rows once
  combine    fold rows -> R partial rows (one per (token, source rank)), all-to-all back,
             fold partials per token in rank order
Dedup: a token crosses to a rank once however many of that rank's experts it chose.
"""
from __future__ import annotations

import numpy as np

from comms.kernels import native

_NO_SPLIT = 1 << 62     # reduce_rows: every row comes from src_a


def gather_rows(dst: np.ndarray, src: np.ndarray, idx: np.ndarray) -> None:
    """dst[i] = src[idx[i]] (2-D C-contiguous arrays of one dtype, idx int64)."""
    if idx.size:
        native.impl().moe_gather_rows(native.addr(dst), native.addr(src), native.addr(idx),
                                      idx.size, dst.shape[1] * dst.itemsize)


def reduce_rows(out, offsets, entries, weights, src_a, split, src_b, dtype) -> None:
    """out[j] = fold of w[e] * row(entries[e]) over e in [offsets[j], offsets[j+1])."""
    if out.shape[0]:
        addr = native.addr
        native.impl().moe_reduce_rows(
            addr(out), out.shape[0], addr(offsets), addr(entries) if entries.size else 0,
            addr(weights) if weights is not None and weights.size else 0,
            addr(src_a) if src_a.size else 0, split,
            addr(src_b) if src_b is not None and src_b.size else 0, out.shape[1], dtype)


def row_dot(out, a, idx_a, b, dtype) -> None:
    """out[i] = <a[idx_a[i]], b[i]> (float32 out, float64 lanes)."""
    if out.size:
        addr = native.addr
        native.impl().moe_row_dot(addr(out), out.size, addr(a), addr(idx_a), addr(b), 0,
                                  a.shape[1], dtype)


def _split_self(meta, sp):
    o, r = sp.send_offsets, sp.rank
    return np.concatenate([meta[:o[r]], meta[o[r + 1]:]]), meta[o[r]:o[r + 1]]


class FlatRoute:
    """One stage: every token goes straight to each rank that needs it (one host, or a
    group treated as one). `forward_rows` moves token rows source -> receivers (dispatch,
    combine's backward); `return_rows` moves one partial row per (token, rank) back and folds
    them in rank order (combine, dispatch's backward); `weights_back` returns per-slot values."""

    def __init__(self, ex, sp, rp):
        self.ex, self.sp, self.rp = ex, sp, rp

    def forward_rows(self, x, out, what="dispatch") -> None:
        """out [R, H] (recv order) <- rows of x [T, H]: own rows copied, the rest exchanged."""
        ex, sp, rp = self.ex, self.sp, self.rp
        H = x.shape[1]
        remote = sp.remote_token_idx()
        send = ex.scratch("send", (remote.size, H), x.dtype)
        gather_rows(send, x, remote)
        ex.rows(what, send, sp.remote_counts(), out[rp.num_self:], rp.recv_counts,
                H * x.itemsize)
        gather_rows(out[:rp.num_self], x, sp.self_token_idx())

    def return_rows(self, partials, out, dtype, what="combine") -> None:
        """out [T, H] = per token, the fold over ranks (ascending) of its partial rows;
        partials [R, H] (recv order), one row per received token; own rows never leave."""
        ex, sp, rp = self.ex, self.sp, self.rp
        H = partials.shape[1]
        back = ex.scratch("back", (sp.remote_token_idx().size, H), partials.dtype)
        ex.rows(what, partials[rp.num_self:], rp.recv_counts, back, sp.remote_counts(),
                H * partials.itemsize)
        reduce_rows(out, sp.src_offsets, sp.src_entries, None, partials, rp.num_self, back, dtype)

    def weights_back(self, per_item, what="dispatch backward") -> np.ndarray:
        """per_item [R, k] float32 (recv order; 0 where a slot is not here) -> [T, k] on the
        source, each slot's value from the rank holding its expert (0 where topk_idx is -1)."""
        ex, sp, rp = self.ex, self.sp, self.rp
        k = sp.topk
        back = np.empty((sp.remote_token_idx().size, k), np.float32)
        ex.rows(what, per_item[rp.num_self:], rp.recv_counts, back, sp.remote_counts(), 4 * k)
        both = np.concatenate([per_item[:rp.num_self], back])
        out = np.zeros((sp.num_tokens, k), np.float32)
        t, s = np.nonzero(sp.dst_of_slot < sp.num_ranks)
        out[t, s] = both[sp.src_pos[t, sp.dst_of_slot[t, s]], s]
        return out


# ------------------------------------------------------------------------------ combine

def combine_rows(route, rp, y, row_weights, out, dtype, what="combine") -> None:
    """out [T, H] = weighted sum of each token's expert rows y [rows, H] (row order)."""
    partials = route.ex.scratch("partials", (rp.num_recv_tokens, y.shape[1]), y.dtype)
    w = np.ascontiguousarray(row_weights[rp.recv_entries], np.float32)
    reduce_rows(partials, rp.recv_offsets, rp.recv_entries, w, y, _NO_SPLIT, None, dtype)
    route.return_rows(partials, out, dtype, what)


def combine_backward(route, rp, grad_out, y, row_weights, grad_y, dtype, what="combine backward"):
    """grad_y [rows, H] = w * grad_out[token]; returns grad of row weights [rows] float32
    (<grad_out[token], y[row]>). grad_out [T, H] travels like dispatch (one row per
    (token, rank))."""
    g = route.ex.scratch("grad", (rp.num_recv_tokens, grad_out.shape[1]), grad_out.dtype)
    route.forward_rows(grad_out, g, what)
    rows = rp.num_rows
    offsets = np.arange(rows + 1, dtype=np.int64)
    reduce_rows(grad_y, offsets, rp.row_recv_token,
                np.ascontiguousarray(row_weights, np.float32), g, _NO_SPLIT, None, dtype)
    grad_w = np.empty(rows, np.float32)
    row_dot(grad_w, g, rp.row_recv_token, y, dtype)
    return grad_w


def weights_back(route, rp, grad_w_rows, what="dispatch backward") -> np.ndarray:
    """Gradient of the row weights [rows] -> gradient of topk_weights [T, k] float32 on the
    source (0 where topk_idx is -1)."""
    per_item = np.zeros((rp.num_recv_tokens, route.sp.topk), np.float32)
    per_item[rp.row_recv_token, rp.row_slot] = grad_w_rows
    return route.weights_back(per_item, what)
