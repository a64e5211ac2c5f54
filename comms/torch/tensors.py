"""Tensors in and out of the Communicator: a non-contiguous tensor replaced by a dense copy
and the result written back (outside autograd, into inference tensors), byte and real views,
lists flattened into one buffer and a flat result copied out to a list. Called inside the
work functions, when the operation runs."""
from __future__ import annotations

import torch


def _write_back(dst, src):
    """dst.copy_(src) as a backend writes a result: outside autograd (into a view of a
    leaf that requires grad, as gloo does) and into inference tensors."""
    if dst.is_inference():
        with torch.inference_mode():
            dst.copy_(src)
    else:
        with torch.no_grad():
            dst.copy_(src)


def _as_bytes(dense):
    """A contiguous tensor's memory as uint8 (a view: writes land in the tensor)."""
    return dense.reshape(-1).view(torch.uint8)


def _as_real(tensor):
    """The real view of a complex tensor (a conjugate one resolved now, when the
    operation runs, like every copy of an input); others as they are."""
    return torch.view_as_real(tensor.resolve_conj()) if tensor.is_complex() else tensor


def _into(tensor, run, write_back=True):
    """run(t) on the tensor itself when it is dense, else on a dense copy and (write_back)
    the result copied back into it. Called inside the work function, when the operation
    runs: a copy made when it is issued would miss what work queued before it writes
    (and copy stale data back)."""
    if tensor.is_contiguous():
        run(tensor)
        return
    dense = tensor.contiguous()
    run(dense)
    if write_back:
        _write_back(tensor, dense)


def _nbytes(tensor):
    return tensor.nbytes


def _flat_cat(tensors, dtype, device=None):
    if not tensors:
        return torch.empty(0, dtype=dtype, device=device)
    return torch.cat([t.reshape(-1) for t in tensors])


def _copy_out(flat, outs):
    offset = 0
    for out in outs:
        n = out.numel()
        _write_back(out, flat[offset:offset + n].view(out.shape))
        offset += n
