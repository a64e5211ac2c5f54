"""The data steps of dispatch and combine on device (CUDA) tensors, one host: what
comms/moe/ops.py FlatRoute and combine_rows do on numpy storage, done with torch operations
on the tensors' own device, the rows exchanged by the group's all-to-all on device buffers
(comms/algorithms/device/ipc.py: CUDA IPC, the rows never leave device memory).

Same plans (comms/moe/plan.py), same row orders and the same bits as the host path (NaN
payloads aside): the folds run slot by slot in the host kernels' order
(comms/kernels/reference_moe.py moe_reduce_rows: accumulate in float32, float64 for float64;
the weight times the row, then the sum, each rounded on its own; one rounding to the dtype at
the end), each step one gather and one indexed add over the rows that have that slot (no
atomics: the order is fixed). Every index list a handle needs goes to the device once, when
the dispatch makes it: the steps themselves never wait for the GPU.

Imported only where torch is in use (comms/moe/api.py, for torch tensors on a GPU).
Used when every rank's x is a CUDA tensor on a one-host group and no gradient flows through
dispatch (comms/moe/api.py decides it with every rank, at dispatch). combine then stays on
the device too, differentiable w.r.t. the expert outputs (CombineOnDevice).
"""
from __future__ import annotations

import numpy as np
import torch

from comms.core import dtypes as dt

NO_SPLIT = 1 << 62          # every row of a fold comes from its first source


def _upload(arrays, device):
    """The int64 numpy arrays as tensors on `device`, in one copy (a synchronous one: the
    tensors can then be used on any stream)."""
    sizes = [int(np.asarray(a).size) for a in arrays]
    flat = np.concatenate([np.asarray(a, np.int64).ravel() for a in arrays]) if arrays \
        else np.empty(0, np.int64)
    dev = torch.from_numpy(flat).to(device)
    out, at = [], 0
    for n in sizes:
        out.append(dev[at:at + n])
        at += n
    return out


class FoldPlan:
    """The slots of a fold out[j] = sum over e in [offsets[j], offsets[j+1]) of w[e] *
    row(entries[e]), rows of [src_a[:split]; src_b]: per slot s, the outputs that have it,
    their entry positions, and where each row comes from. numpy lists (see tensors())."""

    def __init__(self, offsets, entries, split):
        offsets = np.asarray(offsets, np.int64)
        entries = np.asarray(entries, np.int64)
        self.n_out = offsets.size - 1
        cnt = np.diff(offsets)
        self.slots = []             # per slot: (sel, e, ia, rows_a, ib, rows_b)
        for s in range(int(cnt.max()) if cnt.size else 0):
            sel = np.flatnonzero(cnt > s)
            e = offsets[:-1][sel] + s
            rows = entries[e]
            in_a = rows < split
            ia, ib = np.flatnonzero(in_a), np.flatnonzero(~in_a)
            self.slots.append((sel, e, ia, rows[ia], ib, rows[ib] - split))

    def arrays(self) -> list:
        return [a for slot in self.slots for a in slot]

    def take(self, tensors) -> None:
        """Replace the numpy lists by their device tensors (in arrays() order)."""
        it = iter(tensors)
        self.slots = [tuple(next(it) for _ in range(6)) for _ in self.slots]


def reduce_rows(out, plan: FoldPlan, weights, src_a, src_b, dtype) -> None:
    """out = the fold `plan` describes, on out's device (plan's tensors there); weights: a
    float32 tensor indexed by entry position, or None."""
    n_out, hidden = out.shape[0], out.shape[1]
    if not n_out:
        return
    acc_t = torch.float64 if dtype == dt.F64 else torch.float32
    acc = torch.zeros((n_out, hidden), dtype=acc_t, device=out.device)
    for sel, e, ia, rows_a, ib, rows_b in plan.slots:
        if not ib.numel():
            y = src_a.index_select(0, rows_a)
        else:
            y = torch.empty((e.numel(), hidden), dtype=src_b.dtype, device=out.device)
            if ia.numel():
                y[ia] = src_a.index_select(0, rows_a)
            y[ib] = src_b.index_select(0, rows_b)
        y = y.to(acc_t)
        if weights is not None:
            y = weights.index_select(0, e).to(acc_t)[:, None] * y
        acc[sel] = acc.index_select(0, sel) + y
    out.copy_(acc.to(out.dtype))


class DeviceRows:
    """FlatRoute's steps (comms/moe/ops.py) on tensors of one device, for one dispatch's
    plans. A failure in a step's own work before its exchange makes the peers' exchange
    raise too (Exchange.reject), so no rank waits for it."""

    def __init__(self, ex, sp, rp, device):
        self.ex, self.sp, self.rp, self.device = ex, sp, rp, device
        rows = rp.num_rows
        self.partials_plan = FoldPlan(rp.recv_offsets, rp.recv_entries, NO_SPLIT)
        self.return_plan = FoldPlan(sp.src_offsets, sp.src_entries, rp.num_self)
        self.grad_plan = FoldPlan(np.arange(rows + 1, dtype=np.int64), rp.row_recv_token,
                                  NO_SPLIT)
        plans = (self.partials_plan, self.return_plan, self.grad_plan)
        fixed = [sp.remote_token_idx(), sp.self_token_idx(), rp.recv_entries]
        tensors = _upload(fixed + [a for p in plans for a in p.arrays()], device)
        self.remote_idx, self.self_idx, self.recv_entries = tensors[:3]
        at = 3
        for p in plans:
            k = len(p.arrays())
            p.take(tensors[at:at + k])
            at += k

    def _local(self, fn, *args, **kwargs):
        """fn(*args, **kwargs), this rank's work before an exchange: on failure the peers'
        pending exchange raises too."""
        try:
            return fn(*args, **kwargs)
        except BaseException:
            self.ex.reject()
            raise

    def _rows(self, what, send, send_rows, recv, recv_rows, row_bytes):
        empty = torch.empty(0, dtype=torch.uint8, device=self.device)
        s = send.reshape(-1).view(torch.uint8) if send.numel() else empty
        r = recv.reshape(-1).view(torch.uint8) if recv.numel() else empty
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        self.ex.rows_bytes(what, s, r, [int(c) * row_bytes for c in send_rows],
                           [int(c) * row_bytes for c in recv_rows], stream=stream)

    def forward_rows(self, x, out, what="dispatch") -> None:
        """out [R, H] (recv order) <- rows of x [T, H]: own rows copied, the rest exchanged."""
        sp, rp = self.sp, self.rp
        send = self._local(x.index_select, 0, self.remote_idx)
        self._rows(what, send, sp.remote_counts(), out[rp.num_self:], rp.recv_counts,
                   x.shape[1] * x.element_size())
        if rp.num_self:
            out[:rp.num_self] = x.index_select(0, self.self_idx)

    def return_rows(self, partials, out, dtype, what="combine") -> None:
        """out [T, H] = per token, the fold over ranks (ascending) of its partial rows."""
        sp, rp = self.sp, self.rp
        H = partials.shape[1]
        back = self._local(torch.empty, (int(self.remote_idx.numel()), H),
                           dtype=partials.dtype, device=self.device)
        self._rows(what, partials[rp.num_self:], rp.recv_counts, back, sp.remote_counts(),
                   H * partials.element_size())
        reduce_rows(out, self.return_plan, None, partials, back, dtype)

    def combine(self, y, row_weights, out, dtype, what="combine") -> None:
        """out [T, H] = weighted sum of each token's expert rows y [rows, H] (row order);
        row_weights [rows] float32 on the device."""
        self.return_rows(self._local(self._partials, y, row_weights, dtype), out, dtype, what)

    def _partials(self, y, row_weights, dtype):
        partials = torch.empty((self.rp.num_recv_tokens, y.shape[1]), dtype=y.dtype,
                               device=self.device)
        w = row_weights.index_select(0, self.recv_entries)
        reduce_rows(partials, self.partials_plan, w, y, None, dtype)
        return partials

    def combine_backward(self, grad_out, row_weights, dtype):
        """grad of the expert outputs [rows, H] = w[row] * grad_out[token of row]: grad_out
        travels like a dispatch (one row per (token, rank))."""
        rp = self.rp
        g = self._local(torch.empty, (rp.num_recv_tokens, grad_out.shape[1]),
                        dtype=grad_out.dtype, device=self.device)
        self.forward_rows(grad_out, g, "combine backward")
        grad_y = torch.empty((rp.num_rows, grad_out.shape[1]), dtype=grad_out.dtype,
                             device=self.device)
        reduce_rows(grad_y, self.grad_plan, row_weights, g, None, dtype)
        return grad_y


def _combine(y, handle):
    out = torch.empty((handle.num_tokens, handle.hidden), dtype=y.dtype, device=y.device)
    handle.device_rows.combine(y.detach(), handle.weights, out, handle.dtype)
    return out


class CombineOnDevice(torch.autograd.Function):
    """combine on the device; backward: grad_y = w * grad_out[token] (a dispatch of the
    gradient, then one weighted gather), the same steps as the host path's."""

    @staticmethod
    def forward(ctx, y, handle):
        ctx.handle = handle
        return _combine(y, handle)

    @staticmethod
    def backward(ctx, grad_out):
        h = ctx.handle
        return h.device_rows.combine_backward(grad_out.contiguous(), h.weights, h.dtype), None


def combine_on_device(y, handle):
    """combine of expert outputs y on the dispatch's device: differentiable w.r.t. y when
    autograd wants it (the weights carry no gradient on this path)."""
    if torch.is_grad_enabled() and y.requires_grad:
        return CombineOnDevice.apply(y, handle)
    return _combine(y, handle)
