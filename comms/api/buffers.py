"""Normalize user buffers to Bufs (comms/core/buffers.py): numpy arrays, torch tensors (CPU
or CUDA), and any object with __cuda_array_interface__ (cupy, numba) or DLPack.

Checks happen here, before any data moves, and name the argument they reject. A buffer in
memory no algorithm serves yet (CUDA) is described faithfully (kind, device, stream); the
plan, not this module, says whether a collective can run on it.
"""
from __future__ import annotations

import ctypes

import numpy as np

from comms.core import dtypes as dt
from comms.core.buffers import CUDA, Buf
from comms.kernels import native


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
        return Buf(native.addr(obj), obj.size, code, obj)
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
        code = _torch_codes().get(obj.dtype)
        if code is None:
            raise TypeError(f"{name}: unsupported dtype {obj.dtype}")
        if not obj.is_contiguous():
            raise ValueError(f"{name}: tensor must be contiguous (call .contiguous())")
        if obj.device.type == "cuda":
            dev = obj.device.index if obj.device.index is not None else \
                torch.cuda.current_device()
            return Buf(obj.data_ptr(), obj.numel(), code, obj, CUDA, dev,
                       torch.cuda.current_stream(dev).cuda_stream)
        if obj.device.type != "cpu":
            raise ValueError(f"{name}: tensor on {obj.device}; host (cpu) and cuda tensors "
                             "are supported")
        return Buf(obj.data_ptr(), obj.numel(), code, obj)
    cai = getattr(obj, "__cuda_array_interface__", None)
    if cai is not None:
        return _from_cuda_array_interface(obj, cai, name, writable)
    if hasattr(obj, "__dlpack_device__"):
        return _from_dlpack(obj, name, writable)
    raise TypeError(f"{name}: expected a numpy array, a torch tensor or an array with "
                    f"__cuda_array_interface__ or DLPack, got {type(obj).__name__}")


def _dense(shape, strides, itemsize) -> bool:
    """Whether strides (in bytes; None: C order) describe a C-contiguous array."""
    if strides is None:
        return True
    expect = itemsize
    for n, st in zip(reversed(shape), reversed(strides)):
        if n != 1 and st != expect:
            return False
        expect *= n
    return True


def _code_of(np_dtype, name):
    code = dt.code_of_numpy(np.dtype(np_dtype))
    if code is None:
        raise TypeError(f"{name}: unsupported dtype {np_dtype}; supported: "
                        f"{', '.join(dt.DTYPE_NAMES.values())}")
    return code


def _from_cuda_array_interface(obj, cai, name, writable):
    """A CUDA Buf from __cuda_array_interface__ (version 2+: data, shape, typestr, strides,
    stream). The device is the one that holds the pointer (CUDA's pointer attributes are
    not queried here: the interface gives none, so device is None unless the object has
    a .device with an id, as cupy arrays do)."""
    ptr, readonly = cai["data"]
    code = _code_of(cai["typestr"], name)
    shape = tuple(cai["shape"])
    if not _dense(shape, cai.get("strides"), dt.DTYPE_SIZES[code]):
        raise ValueError(f"{name}: array must be C-contiguous")
    if writable and readonly:
        raise ValueError(f"{name}: buffer is read-only")
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    device = getattr(getattr(obj, "device", None), "id", None)
    return Buf(int(ptr or 0), count, code, obj, CUDA, device, cai.get("stream"))


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", _DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


_DL_CPU, _DL_CUDA, _DL_CUDA_HOST, _DL_CUDA_MANAGED = 1, 2, 3, 13
_DL_KINDS = {0: "i", 1: "u", 2: "f", 6: "b"}     # DLPack type codes: int, uint, float, bool
_BF16 = 4                                         # kDLBfloat


def _from_dlpack(obj, name, writable):
    """A Buf from DLPack: CPU tensors through numpy's importer (a numpy view), CUDA ones by
    reading the DLTensor the capsule holds (the capsule stays with the Buf's owner, so the
    producer's memory lives as long as the Buf)."""
    dev_type, dev_id = obj.__dlpack_device__()
    if dev_type in (_DL_CPU, _DL_CUDA_HOST):
        try:
            arr = np.from_dlpack(obj)
        except (TypeError, BufferError, RuntimeError) as exc:
            raise TypeError(f"{name}: DLPack import failed: {exc}") from None
        return as_buf(arr, name, writable)
    if dev_type not in (_DL_CUDA, _DL_CUDA_MANAGED):
        raise TypeError(f"{name}: DLPack device type {dev_type} is not supported (host and "
                        "cuda are)")
    capsule = obj.__dlpack__()
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    # a DLManagedTensor starts with its DLTensor
    t = _DLTensor.from_address(get(capsule, b"dltensor"))
    shape = tuple(t.shape[i] for i in range(t.ndim))
    bits, kind = t.dtype.bits, t.dtype.code
    if kind == _BF16 and bits == 16:
        code = dt.BF16
    elif kind in _DL_KINDS and t.dtype.lanes == 1:
        code = _code_of(f"{_DL_KINDS[kind]}{bits // 8}" if kind != 6 else "?", name)
    else:
        raise TypeError(f"{name}: unsupported DLPack dtype (code {kind}, {bits} bits)")
    strides = None if not t.strides else tuple(
        t.strides[i] * dt.DTYPE_SIZES[code] for i in range(t.ndim))
    if not _dense(shape, strides, dt.DTYPE_SIZES[code]):
        raise ValueError(f"{name}: array must be C-contiguous")
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    return Buf((t.data or 0) + t.byte_offset, count, code, (obj, capsule), CUDA, dev_id, None)
