"""cuda_ipc: device memory and events shared between the processes of one host (CUDA IPC),
through the CUDA driver API (ctypes on libcuda.so.1: no cupy or torch needed for this part).

A rank exports an allocation as a 64-byte memory handle plus the offset of its buffer in that
allocation (a handle names the whole allocation); a peer opens the handle once and reads or
writes the buffer at base + offset, on the same GPU or, with peer access (enabled when the
handle is opened), on another GPU of the host. Events made interprocess are shared the same
way: a rank records its event on its own stream, a peer makes its stream wait on it. No
kernel ever spins on memory another process writes: processes on one GPU are time-sliced,
so the order between ranks comes from the host (the shared-memory arrivals of the host
group) plus these events.

Opened memory handles are cached per process by their bytes (a bounded number; the oldest
are closed); events belong to the group that made or opened them, which destroys them. Every
call runs in the primary context of the buffer's device, pushed and popped around it, so the
caller's current device is left as it was.
"""
from __future__ import annotations

import contextlib
import ctypes
from collections import OrderedDict

HANDLE_BYTES = 64
OPEN_CACHE = 256                 # opened memory handles kept per process
_LAZY_PEER_ACCESS = 1            # CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS
_EVENT_FLAGS = 0x2 | 0x4         # CU_EVENT_DISABLE_TIMING | CU_EVENT_INTERPROCESS
_ATTR_DEVICE_ORDINAL = 9         # CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL

_opened = None
_why_none = ""


class _Handle(ctypes.Structure):
    """CUipcMemHandle / CUipcEventHandle: 64 opaque bytes, passed by value."""
    _fields_ = [("reserved", ctypes.c_char * HANDLE_BYTES)]


class CudaError(RuntimeError):
    pass


class DriverIpc:
    """The driver calls the device algorithms need, on one process's GPUs."""

    name = "cuda driver"

    def __init__(self, lib):
        self._lib = lib
        self._contexts: dict = {}            # device ordinal -> primary context
        self._opened: OrderedDict = OrderedDict()   # (device, handle bytes) -> base address
        self._open_mem = getattr(lib, "cuIpcOpenMemHandle_v2", None) or lib.cuIpcOpenMemHandle
        self._open_mem.argtypes = [ctypes.POINTER(ctypes.c_uint64), _Handle, ctypes.c_uint]
        lib.cuIpcOpenEventHandle.argtypes = [ctypes.POINTER(ctypes.c_void_p), _Handle]

    @classmethod
    def load(cls) -> "DriverIpc":
        lib = ctypes.CDLL("libcuda.so.1")
        ipc = cls(lib)
        ipc._check(lib.cuInit(0), "cuInit")
        return ipc

    def _check(self, rc: int, what: str) -> None:
        if rc:
            name = ctypes.c_char_p()
            self._lib.cuGetErrorName(rc, ctypes.byref(name))
            raise CudaError(f"{what} failed: {(name.value or b'?').decode()} ({rc})")

    @contextlib.contextmanager
    def on(self, device: int):
        """The primary context of `device` current for the calls inside."""
        ctx = self._contexts.get(device)
        if ctx is None:
            dev, c = ctypes.c_int(), ctypes.c_void_p()
            self._check(self._lib.cuDeviceGet(ctypes.byref(dev), int(device)), "cuDeviceGet")
            self._check(self._lib.cuDevicePrimaryCtxRetain(ctypes.byref(c), dev),
                        "cuDevicePrimaryCtxRetain")
            ctx = self._contexts[device] = c
        self._check(self._lib.cuCtxPushCurrent_v2(ctx), "cuCtxPushCurrent")
        try:
            yield
        finally:
            self._lib.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))

    def gpu_id(self, device: int) -> str:
        """The PCI bus id of `device` (the same GPU has the same id in every process,
        whatever CUDA_VISIBLE_DEVICES numbers it)."""
        dev = ctypes.c_int()
        self._check(self._lib.cuDeviceGet(ctypes.byref(dev), int(device)), "cuDeviceGet")
        buf = ctypes.create_string_buffer(32)
        self._check(self._lib.cuDeviceGetPCIBusId(buf, len(buf), dev), "cuDeviceGetPCIBusId")
        return buf.value.decode().lower()

    def export(self, addr: int) -> tuple[bytes, int]:
        """(the handle of the allocation holding addr, addr's offset in it)."""
        base, size = ctypes.c_uint64(), ctypes.c_size_t()
        self._check(self._lib.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size),
                                                      ctypes.c_uint64(addr)),
                    "cuMemGetAddressRange")
        h = _Handle()
        self._check(self._lib.cuIpcGetMemHandle(ctypes.byref(h), base), "cuIpcGetMemHandle")
        return bytes(h.reserved), addr - base.value

    def open(self, handle: bytes, device: int) -> int:
        """The base address of a peer's allocation in this process (opened once)."""
        key = (device, handle)
        base = self._opened.get(key)
        if base is not None:
            self._opened.move_to_end(key)
            return base
        ptr = ctypes.c_uint64()
        self._check(self._open_mem(ctypes.byref(ptr), _Handle(handle), _LAZY_PEER_ACCESS),
                    "cuIpcOpenMemHandle")
        self._opened[key] = ptr.value
        while len(self._opened) > OPEN_CACHE:
            _, old = self._opened.popitem(last=False)
            self._lib.cuIpcCloseMemHandle(ctypes.c_uint64(old))
        return ptr.value

    def device_of(self, addr: int) -> int:
        """The ordinal of the device holding addr (in this process's numbering)."""
        out = ctypes.c_int()
        self._check(self._lib.cuPointerGetAttribute(ctypes.byref(out), _ATTR_DEVICE_ORDINAL,
                                                    ctypes.c_uint64(addr)),
                    "cuPointerGetAttribute")
        return out.value

    def new_event(self) -> tuple[int, bytes]:
        """(an interprocess event of the current context, its handle). The caller destroys
        it (destroy_event)."""
        ev = ctypes.c_void_p()
        self._check(self._lib.cuEventCreate(ctypes.byref(ev), _EVENT_FLAGS), "cuEventCreate")
        h = _Handle()
        try:
            self._check(self._lib.cuIpcGetEventHandle(ctypes.byref(h), ev), "cuIpcGetEventHandle")
        except CudaError:
            self._lib.cuEventDestroy_v2(ev)
            raise
        return ev.value, bytes(h.reserved)

    def open_event(self, handle: bytes) -> int:
        """A peer's event in this process (the caller caches it and destroys it)."""
        out = ctypes.c_void_p()
        self._check(self._lib.cuIpcOpenEventHandle(ctypes.byref(out), _Handle(handle)),
                    "cuIpcOpenEventHandle")
        return out.value

    def destroy_event(self, event: int) -> None:
        self._lib.cuEventDestroy_v2(ctypes.c_void_p(event))

    def record(self, event: int, stream: int) -> None:
        self._check(self._lib.cuEventRecord(ctypes.c_void_p(event), ctypes.c_void_p(stream)),
                    "cuEventRecord")

    def wait(self, stream: int, event: int) -> None:
        """Work queued on `stream` from now on runs after the event's last record."""
        self._check(self._lib.cuStreamWaitEvent(ctypes.c_void_p(stream),
                                                ctypes.c_void_p(event), 0),
                    "cuStreamWaitEvent")

    def close_memory(self) -> None:
        """Close every opened memory handle (each in its device's context)."""
        for (device, _), base in list(self._opened.items()):
            with contextlib.suppress(CudaError), self.on(device):
                self._lib.cuIpcCloseMemHandle(ctypes.c_uint64(base))
        self._opened.clear()


def ipc():
    """This process's DriverIpc (loaded on first call), or None (unavailable() says why)."""
    global _opened, _why_none
    if _opened is not None or _why_none:
        return _opened
    try:
        _opened = DriverIpc.load()
    except (OSError, AttributeError, CudaError) as exc:
        _why_none = f"the CUDA driver cannot be used ({type(exc).__name__}: {exc})"
    return _opened


def unavailable() -> str:
    return "" if ipc() is not None else _why_none
