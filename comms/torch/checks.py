"""Argument checks of the torch seam: the errors it raises (_BadValue, _BadType), the reduce
op's name, tensor checks (type, device, elements sharing memory, one tensor per process,
dtypes, complex reductions), split sizes -> element counts, and the `rejecting` decorator
that tells the other ranks when this rank refused a collective's arguments."""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from comms.torch.constants import MEMORY_DEVICES


def _shown_as(base):
    """Class decorator: the error shows (name, module) and pickles (multiprocessing, futures)
    as the builtin `base`. Users see and catch plain ValueError / TypeError; the subclass
    only routes the error (see `rejecting`)."""
    def decorate(cls):
        cls.__name__ = cls.__qualname__ = base.__name__
        cls.__module__ = "builtins"
        cls.__reduce__ = lambda self: (base, self.args)
        return cls
    return decorate


@_shown_as(ValueError)
class _BadValue(ValueError):
    """An argument the torch seam refused. Raised on this rank only, so the method takes
    part in its collective flagged first (ProcessGroupTopocomm._reject_everywhere): every
    rank raises, no data moves, and the group stays usable."""


@_shown_as(TypeError)
class _BadType(TypeError):
    """A TypeError the torch seam raised for an argument (see _BadValue)."""


def rejecting(coll):
    """Method decorator: a _BadValue / _BadType raised by the method is first reported to the
    group's other ranks as a refused `coll` (self._reject_everywhere), then re-raised."""
    def decorate(method):
        @functools.wraps(method)
        def checked(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except (_BadValue, _BadType):
                self._reject_everywhere(coll)
                raise
        return checked
    return decorate


_SUM = dist.ReduceOp.SUM
_RedOpType = dist.ReduceOp.RedOpType
# keyed by the enum's int value: hashing the pybind enum itself costs ~1 us
_OP_NAMES = {getattr(_RedOpType, torch_name).value: name for torch_name, name in (
    ("SUM", "sum"), ("AVG", "avg"), ("PRODUCT", "prod"), ("MIN", "min"), ("MAX", "max"),
    ("BAND", "band"), ("BOR", "bor"), ("BXOR", "bxor"))}


def _op_name(opts) -> str:
    """Communicator op string for options carrying reduceOp (or a bare ReduceOp)."""
    op = getattr(opts, "reduceOp", opts)
    if op == _SUM:
        return "sum"
    code = getattr(op, "op", op)  # ReduceOp -> RedOpType
    name = _OP_NAMES.get(getattr(code, "value", code))
    if name is None:
        raise _BadValue(f"op: {getattr(code, 'name', op)} is not supported by the "
                        f"topocomm backend (PREMUL_SUM is NCCL-only); use one of "
                        f"SUM, AVG, PRODUCT, MIN, MAX, BAND, BOR, BXOR")
    return name


_has_overlap = getattr(torch, "_debug_has_internal_overlap", None)


def _overlaps(tensor):
    """Elements sharing memory (an expand()ed or as_strided view): no place for a result."""
    if _has_overlap is not None:
        return _has_overlap(tensor) == 1
    return any(st == 0 and n > 1 for st, n in zip(tensor.stride(), tensor.shape))


def _check(tensor, arg, out=False):
    """out: the tensor receives a result (checked for elements that share memory)."""
    if not isinstance(tensor, torch.Tensor):
        raise _BadType(f"{arg}: expected a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_cpu and tensor.device.type not in MEMORY_DEVICES:  # .device: 0.5 us
        raise _BadValue(f"{arg}: tensor is on {tensor.device}; the topocomm backend "
                        f"takes {', '.join(MEMORY_DEVICES)} tensors")
    if out and not tensor.is_contiguous() and _overlaps(tensor):
        raise _BadValue(f"{arg}: its elements share memory (an expand()ed or as_strided "
                        "view), so it cannot receive a result; pass a tensor that owns "
                        "its elements (.clone())")
    return tensor


def _one(tensors, arg, out=False):
    if isinstance(tensors, torch.Tensor):
        return _check(tensors, arg, out)
    if len(tensors) != 1:
        raise _BadValue(f"{arg}: expected exactly one tensor per process, "
                        f"got {len(tensors)}")
    return _check(tensors[0], arg, out)


def _same_dtype(tensors, dtype, arg, out=False):
    for i, t in enumerate(tensors):
        _check(t, f"{arg}[{i}]", out)
        if t.dtype != dtype:
            raise _BadType(f"{arg}[{i}]: dtype {t.dtype} differs from {dtype}")


def _complex_ok(tensor, op, arg, out=False):
    """A complex tensor in a reduction (torch's all_reduce turns it into its real view
    before a backend sees it; reduce and reduce_scatter do not): SUM and AVG act on the
    real and imaginary parts alone (comms.torch.tensors._as_real, when the operation runs);
    other ops are not defined, and a conjugate view cannot receive a result."""
    if not tensor.is_complex():
        return
    if op not in ("sum", "avg"):
        raise _BadValue(f"op: {op} is not defined on complex tensors ({arg})")
    if out and tensor.is_conj():
        raise _BadValue(f"{arg}: a conjugate view cannot receive a result; pass "
                        f"{arg}.resolve_conj()")


def _split_counts(tensor, split_sizes, arg, size):
    """Rows per peer (dim 0) -> elements per peer in a group of `size`; empty = even split."""
    rows = tensor.shape[0] if tensor.dim() else 1
    row_numel = tensor.numel() // rows if rows else 0
    if tensor.dim() and rows == 0:
        row_numel = 1
        for d in tensor.shape[1:]:
            row_numel *= d
    splits = list(split_sizes)
    if not splits:
        if rows % size:
            raise _BadValue(f"{arg}: dim 0 ({rows}) is not divisible by world size "
                            f"{size}; pass split sizes")
        return [rows // size * row_numel] * size
    if len(splits) != size:
        raise _BadValue(f"{arg}: {len(splits)} entries, expected world size {size}")
    if any(s < 0 for s in splits) or sum(splits) != rows:
        raise _BadValue(f"{arg}: {splits} must be non-negative and sum to dim 0 "
                        f"({rows})")
    return [int(s) * row_numel for s in splits]
