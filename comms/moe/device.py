"""The data steps of dispatch and combine on device (CUDA) tensors, one host: what
comms/moe/ops.py FlatRoute and combine_rows do on numpy storage, done with torch operations
on the tensors' own device, the rows exchanged by the group's all-to-all on device buffers
(comms/algorithms/device/ipc.py: CUDA IPC, the rows never leave device memory).

Same plans (comms/moe/plan.py), same row orders and the same bits as the host path: the
folds run slot by slot in the host kernels' order (comms/kernels/reference_moe.py
moe_reduce_rows: accumulate in float32, float64 for float64, the weight times the row, then
the sum, each its own rounding; one rounding to the dtype at the end), each step one
gather and one indexed add over the rows that have that slot (no atomics: the order is
fixed).

Used when every rank's x is a CUDA tensor on a one-host group and no gradient is wanted
(comms/moe/api.py decides it with every rank, at dispatch); otherwise the host path runs.
"""
from __future__ import annotations

import numpy as np

from comms.core import dtypes as dt


def _index(torch, a: np.ndarray, device):
    return torch.from_numpy(np.ascontiguousarray(a, np.int64)).to(device, non_blocking=False)


def reduce_rows(out, offsets, entries, weights, src_a, split, src_b, dtype) -> None:
    """out[j] = fold over e in [offsets[j], offsets[j+1]) of weights[e] * row(entries[e]),
    rows of the virtual concatenation [src_a[:split]; src_b]; offsets / entries numpy
    int64, weights a float32 tensor on out's device indexed by e (or None), src_* tensors."""
    import torch
    n_out, hidden = out.shape[0], out.shape[1]
    if not n_out:
        return
    device = out.device
    acc_t = torch.float64 if dtype == dt.F64 else torch.float32
    acc = torch.zeros((n_out, hidden), dtype=acc_t, device=device)
    offsets = np.asarray(offsets, np.int64)
    entries = np.asarray(entries, np.int64)
    cnt = np.diff(offsets)
    for s in range(int(cnt.max()) if cnt.size else 0):
        sel = np.flatnonzero(cnt > s)
        e = offsets[:-1][sel] + s
        rows = entries[e]
        in_a = rows < split
        if in_a.all():
            y = src_a.index_select(0, _index(torch, rows, device))
        else:
            y = torch.empty((rows.size, hidden), dtype=src_b.dtype, device=device)
            ia, ib = np.flatnonzero(in_a), np.flatnonzero(~in_a)
            if ia.size:
                y[_index(torch, ia, device)] = src_a.index_select(0, _index(torch, rows[ia],
                                                                            device))
            y[_index(torch, ib, device)] = src_b.index_select(
                0, _index(torch, rows[ib] - split, device))
        y = y.to(acc_t)
        if weights is not None:
            y = weights.index_select(0, _index(torch, e, device)).to(acc_t)[:, None] * y
        at = _index(torch, sel, device)
        acc[at] = acc.index_select(0, at) + y
    out.copy_(acc.to(out.dtype))


class DeviceRows:
    """FlatRoute's steps (comms/moe/ops.py) on tensors of one device."""

    def __init__(self, ex, sp, rp, device):
        self.ex, self.sp, self.rp, self.device = ex, sp, rp, device

    def _rows(self, what, send, send_rows, recv, recv_rows, row_bytes):
        import torch
        empty = torch.empty(0, dtype=torch.uint8, device=self.device)
        s = send.reshape(-1).view(torch.uint8) if send.numel() else empty
        r = recv.reshape(-1).view(torch.uint8) if recv.numel() else empty
        self.ex.rows_bytes(what, s, r, [int(c) * row_bytes for c in send_rows],
                           [int(c) * row_bytes for c in recv_rows])

    def forward_rows(self, x, out, what="dispatch") -> None:
        """out [R, H] (recv order) <- rows of x [T, H]: own rows copied, the rest exchanged."""
        import torch
        sp, rp = self.sp, self.rp
        send = x.index_select(0, _index(torch, sp.remote_token_idx(), self.device))
        self._rows(what, send, sp.remote_counts(), out[rp.num_self:], rp.recv_counts,
                   x.shape[1] * x.element_size())
        if rp.num_self:
            out[:rp.num_self] = x.index_select(0, _index(torch, sp.self_token_idx(),
                                                         self.device))

    def return_rows(self, partials, out, dtype, what="combine") -> None:
        """out [T, H] = per token, the fold over ranks (ascending) of its partial rows."""
        import torch
        sp, rp = self.sp, self.rp
        H = partials.shape[1]
        back = torch.empty((sp.remote_token_idx().size, H), dtype=partials.dtype,
                           device=self.device)
        self._rows(what, partials[rp.num_self:], rp.recv_counts, back, sp.remote_counts(),
                   H * partials.element_size())
        reduce_rows(out, sp.src_offsets, sp.src_entries, None, partials, rp.num_self, back,
                    dtype)

    def combine(self, y, row_weights, out, dtype, what="combine") -> None:
        """out [T, H] = weighted sum of each token's expert rows y [rows, H] (row order);
        row_weights [rows] float32 on the device."""
        import torch
        rp = self.rp
        partials = torch.empty((rp.num_recv_tokens, y.shape[1]), dtype=y.dtype,
                               device=self.device)
        w = row_weights.index_select(0, _index(torch, rp.recv_entries, self.device)) \
            if rp.recv_entries.size else row_weights[:0]
        reduce_rows(partials, rp.recv_offsets, rp.recv_entries, w, y, 1 << 62, None, dtype)
        self.return_rows(partials, out, dtype, what)
