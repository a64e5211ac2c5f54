"""Normalize user buffers (numpy arrays, torch CPU tensors) to (address, count, dtype code).

Checks happen here, before any data moves, and name the argument they reject.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from comms.core import dtypes as dt


@dataclass
class Buf:
    addr: int
    count: int
    dtype: int
    obj: object

    @property
    def nbytes(self) -> int:
        return self.count * dt.DTYPE_SIZES[self.dtype]


_TORCH_CODES: dict = {}
_TORCH_TENSOR = None  # torch.Tensor, once a tensor was seen (torch is never imported here first)


def _remember_torch(torch):
    global _TORCH_TENSOR
    _torch_codes()
    _TORCH_TENSOR = torch.Tensor


def _torch_codes():
    global _TORCH_CODES
    if not _TORCH_CODES:
        import torch
        _TORCH_CODES = {torch.float16: dt.F16, torch.bfloat16: dt.BF16, torch.float32: dt.F32,
                        torch.float64: dt.F64, torch.int8: dt.I8, torch.uint8: dt.U8,
                        torch.int32: dt.I32, torch.int64: dt.I64, torch.bool: dt.BOOL}
    return _TORCH_CODES


def _addr_numpy(arr) -> int:
    return arr.__array_interface__["data"][0]


def as_buf(obj, name: str, writable: bool = False) -> Buf:
    if type(obj) is Buf:  # already normalized by a layer above (comms/api/multihost.py)
        return obj
    if isinstance(obj, np.ndarray):
        code = dt.code_of_numpy(obj.dtype)
        if code is None:
            raise TypeError(f"{name}: unsupported dtype {obj.dtype}; supported: "
                            f"{', '.join(dt.DTYPE_NAMES.values())}")
        if not obj.flags.c_contiguous:
            raise ValueError(f"{name}: buffer must be C-contiguous (use np.ascontiguousarray)")
        if writable and not obj.flags.writeable:
            raise ValueError(f"{name}: buffer is read-only")
        return Buf(_addr(obj), obj.size, code, obj)
    if type(obj) is _TORCH_TENSOR:   # the common torch case, with the fewest attribute reads
        code = _TORCH_CODES.get(obj.dtype)
        if code is not None and obj.is_cpu and obj.is_contiguous():
            return Buf(obj.data_ptr(), obj.numel(), code, obj)
    mod = type(obj).__module__
    if mod.startswith("torch"):
        import torch
        if not isinstance(obj, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor or array, got {type(obj).__name__}")
        _remember_torch(torch)
        if obj.device.type != "cpu":
            raise ValueError(f"{name}: tensor on {obj.device}; only CPU tensors are supported "
                             "by this build")
        code = _torch_codes().get(obj.dtype)
        if code is None:
            raise TypeError(f"{name}: unsupported dtype {obj.dtype}")
        if not obj.is_contiguous():
            raise ValueError(f"{name}: tensor must be contiguous (call .contiguous())")
        return Buf(obj.data_ptr(), obj.numel(), code, obj)
    if mod.startswith("cupy"):
        raise TypeError(f"{name}: cupy arrays need the cuda transport, not built yet")
    raise TypeError(f"{name}: expected a numpy array or torch tensor, got {type(obj).__name__}")


def _addr(arr) -> int:
    """Address of a contiguous numpy array: the buffer protocol through the C helpers
    (about 10x cheaper than arr.ctypes.data), else the array interface."""
    global _addr
    try:
        from comms.kernels.native import impl
        fn = impl().addr_of
        if impl().__name__.endswith("fallback"):
            raise AttributeError
        _addr = fn
    except (ImportError, AttributeError):
        _addr = _addr_numpy
    return _addr(arr)
