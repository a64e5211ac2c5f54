"""Copies between device (CUDA) memory and host memory, by address.

The collectives that stage device buffers through host memory
(comms/algorithms/device/staged.py) read a device Buf into a host array and write a host
array back into a device Buf with these. Each copy is ordered after the work already queued
on the Buf's stream (the stream its producer used: the caller's current stream for torch
tensors, the `stream` of __cuda_array_interface__; none: the current stream) and has
finished when the call returns, so the caller's later work on that stream sees the data.

Engines, one chosen per process (engine()):
    torch   the address wrapped as a uint8 CUDA tensor (through __cuda_array_interface__),
            copied with Tensor.copy_ on the Buf's stream; host arrays pinned with
            torch.empty(pin_memory=True)
    cupy    cudaMemcpyAsync on the Buf's stream, then a stream synchronize; host arrays
            pinned with cupy.cuda.alloc_pinned_memory
torch is preferred when it sees a GPU (its CUDA context is the one torch users already
have); cupy otherwise. Neither: engine() returns None and unavailable() says why.
"""
from __future__ import annotations

import numpy as np

_chosen = None
_why_none = ""


class RawDevice:
    """nbytes of device memory at addr, as __cuda_array_interface__ describes it."""

    def __init__(self, addr: int, nbytes: int):
        self.__cuda_array_interface__ = {"data": (addr, False), "shape": (nbytes,),
                                         "typestr": "|u1", "strides": None, "version": 3,
                                         "stream": None}


def torch_stream(torch, handle: int, device):
    """The torch stream of a CUDA stream handle on `device`. The default streams by their
    handles (0: the NULL stream torch reports for its default stream, 1: legacy, 2:
    per-thread, which the legacy default stream synchronizes with) are torch's default
    stream: torch's ExternalStream cannot wrap them (0 would give a fresh pool stream, 1
    and 2 are refused)."""
    if handle in (0, 1, 2):
        return torch.cuda.default_stream(device)
    return torch.cuda.ExternalStream(handle, device=device)


class TorchEngine:
    name = "torch"

    def __init__(self, torch):
        self.torch = torch

    def host_array(self, nbytes: int) -> np.ndarray:
        """nbytes of pinned host memory as a numpy uint8 array (it keeps the memory)."""
        return self.torch.empty(max(nbytes, 1), dtype=self.torch.uint8,
                                pin_memory=True).numpy()[:nbytes]

    def _device(self, buf):
        torch = self.torch
        return torch.device("cuda", buf.device if buf.device is not None else
                            torch.cuda.current_device())

    def _stream(self, buf, device):
        if buf.stream is None:
            return self.torch.cuda.current_stream(device)
        return torch_stream(self.torch, int(buf.stream), device)

    def _device_bytes(self, buf, offset, nbytes, device):
        raw = RawDevice(buf.addr + offset, nbytes)
        if buf.device is not None:
            # the device given: as_tensor would otherwise follow a default-device context
            # and copy the bytes elsewhere instead of viewing them
            return self.torch.as_tensor(raw, device=device)
        # device unknown (an interface without one): torch reads it from the pointer, with
        # any default-device mode out of the way
        with self.torch._C.DisableTorchFunction():
            return self.torch.as_tensor(raw)

    def to_host(self, host: np.ndarray, buf, offset: int = 0) -> None:
        """host (a uint8 array) = host.nbytes bytes of buf from byte `offset`."""
        if host.nbytes:
            device = self._device(buf)
            with self.torch.cuda.stream(self._stream(buf, device)):
                self.torch.from_numpy(host).copy_(
                    self._device_bytes(buf, offset, host.nbytes, device))

    def to_device(self, buf, host: np.ndarray, offset: int = 0) -> None:
        """host.nbytes bytes of buf from byte `offset` = host (a uint8 array)."""
        if host.nbytes:
            device = self._device(buf)
            with self.torch.cuda.stream(self._stream(buf, device)):
                self._device_bytes(buf, offset, host.nbytes, device).copy_(
                    self.torch.from_numpy(host))

    # pieces (comms/algorithms/device/staged.py overlaps them with the host collective):
    # queued on the buffer's stream, host arrays pinned; an event per piece
    def to_host_async(self, host: np.ndarray, buf, offset: int = 0):
        """Queue host = buf's bytes from `offset`; returns what wait() takes."""
        device = self._device(buf)
        stream = self._stream(buf, device)
        with self.torch.cuda.stream(stream):
            if host.nbytes:
                self.torch.from_numpy(host).copy_(
                    self._device_bytes(buf, offset, host.nbytes, device), non_blocking=True)
            ev = self.torch.cuda.Event()
            ev.record(stream)
        return ev

    def to_device_async(self, buf, host: np.ndarray, offset: int = 0):
        """Queue buf's bytes from `offset` = host; returns what wait() takes. host must stay
        unchanged until then."""
        device = self._device(buf)
        stream = self._stream(buf, device)
        with self.torch.cuda.stream(stream):
            if host.nbytes:
                self._device_bytes(buf, offset, host.nbytes, device).copy_(
                    self.torch.from_numpy(host), non_blocking=True)
            ev = self.torch.cuda.Event()
            ev.record(stream)
        return ev

    def wait(self, event) -> None:
        """Block until the copies queued before `event` are done."""
        event.synchronize()


class CupyEngine:
    name = "cupy"
    _DEFAULT_KIND = 4           # cudaMemcpyDefault: the direction follows from the pointers

    def __init__(self, cupy):
        self.cupy = cupy

    def host_array(self, nbytes: int) -> np.ndarray:
        mem = self.cupy.cuda.alloc_pinned_memory(max(nbytes, 1))
        return np.frombuffer(mem, np.uint8, nbytes)

    def _copy(self, buf, dst: int, src: int, nbytes: int) -> None:
        rt = self.cupy.cuda.runtime
        stream = int(buf.stream) if buf.stream is not None else \
            self.cupy.cuda.get_current_stream().ptr
        with self.cupy.cuda.Device(buf.device if buf.device is not None else
                                   rt.getDevice()):
            rt.memcpyAsync(dst, src, nbytes, self._DEFAULT_KIND, stream)
            rt.streamSynchronize(stream)

    def to_host(self, host: np.ndarray, buf, offset: int = 0) -> None:
        if host.nbytes:
            self._copy(buf, host.ctypes.data, buf.addr + offset, host.nbytes)

    def to_device(self, buf, host: np.ndarray, offset: int = 0) -> None:
        if host.nbytes:
            self._copy(buf, buf.addr + offset, host.ctypes.data, host.nbytes)

    def _copy_async(self, buf, dst: int, src: int, nbytes: int):
        cp = self.cupy
        rt = cp.cuda.runtime
        stream = int(buf.stream) if buf.stream is not None else \
            cp.cuda.get_current_stream().ptr
        with cp.cuda.Device(buf.device if buf.device is not None else rt.getDevice()):
            if nbytes:
                rt.memcpyAsync(dst, src, nbytes, self._DEFAULT_KIND, stream)
            ev = cp.cuda.Event(block=False, disable_timing=True)
            ev.record(cp.cuda.ExternalStream(stream))
        return ev

    def to_host_async(self, host: np.ndarray, buf, offset: int = 0):
        return self._copy_async(buf, host.ctypes.data, buf.addr + offset, host.nbytes)

    def to_device_async(self, buf, host: np.ndarray, offset: int = 0):
        return self._copy_async(buf, buf.addr + offset, host.ctypes.data, host.nbytes)

    def wait(self, event) -> None:
        event.synchronize()


def engine():
    """This process's copy engine (chosen on first call), or None (see unavailable())."""
    global _chosen, _why_none
    if _chosen is not None or _why_none:
        return _chosen
    why = []
    try:
        import torch
        if torch.cuda.is_available():
            _chosen = TorchEngine(torch)
            return _chosen
        why.append("torch sees no GPU")
    except ImportError:
        why.append("torch is not installed")
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() > 0:
            _chosen = CupyEngine(cupy)
            return _chosen
        why.append("cupy sees no GPU")
    except ImportError:
        why.append("cupy is not installed")
    except Exception as exc:  # noqa: BLE001 - cupy raises its own CUDA errors without a GPU
        why.append(f"cupy cannot reach a GPU ({type(exc).__name__}: {exc})")
    _why_none = "; ".join(why)
    return None


def unavailable() -> str:
    """Why no engine can copy device memory here ("" when one can)."""
    return "" if engine() is not None else _why_none
