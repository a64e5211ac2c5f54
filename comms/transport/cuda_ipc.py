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
import threading
from collections import OrderedDict

HANDLE_BYTES = 64
OPEN_CACHE = 256                 # opened memory handles kept per process
_LAZY_PEER_ACCESS = 1            # CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS
_EVENT_FLAGS = 0x2 | 0x4         # CU_EVENT_DISABLE_TIMING | CU_EVENT_INTERPROCESS
_ATTR_DEVICE_ORDINAL = 9         # CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL
# CU_POINTER_ATTRIBUTE_BUFFER_ID (u64), _IS_LEGACY_CUDA_IPC_CAPABLE, _RANGE_START_ADDR
_EXPORT_ATTRS = (ctypes.c_int * 3)(7, 10, 11)
EXPORT_CACHE = 4096              # handles of this process's allocations, by allocation id

_opened = None
_why_none = ""


class Handle(ctypes.Structure):
    """CUipcMemHandle / CUipcEventHandle: 64 opaque bytes (NULs included: bytes(h) gives
    all 64), passed by value."""
    _fields_ = [("reserved", ctypes.c_ubyte * HANDLE_BYTES)]

    @classmethod
    def of(cls, handle: bytes) -> "Handle":
        if len(handle) != HANDLE_BYTES:
            raise ValueError(f"an IPC handle has {HANDLE_BYTES} bytes, got {len(handle)}")
        return cls.from_buffer_copy(handle)


class CudaError(RuntimeError):
    pass


class DriverIpc:
    """The driver calls the device algorithms need, on one process's GPUs."""

    name = "cuda driver"

    def __init__(self, lib):
        self._lib = lib
        self._contexts: dict = {}            # device ordinal -> primary context
        self._opened: OrderedDict = OrderedDict()   # (device, handle bytes) -> base address
        self._exports: dict = {}             # allocation id -> its handle
        self._local_events: dict = {}        # handle bytes -> an event made in this process
        self.generation = 0                  # counts closes of opened handles: an address
                                             # resolved before a change may be stale
        self._lock = threading.Lock()        # groups of several threads share this object
        self._open_mem = getattr(lib, "cuIpcOpenMemHandle_v2", None) or lib.cuIpcOpenMemHandle
        self._open_mem.argtypes = [ctypes.POINTER(ctypes.c_uint64), Handle, ctypes.c_uint]
        lib.cuIpcOpenEventHandle.argtypes = [ctypes.POINTER(ctypes.c_void_p), Handle]

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
        """The UUID of `device` (a MIG instance has its own), else its PCI bus id: the same
        GPU has the same id in every process, whatever CUDA_VISIBLE_DEVICES numbers it."""
        dev = ctypes.c_int()
        self._check(self._lib.cuDeviceGet(ctypes.byref(dev), int(device)), "cuDeviceGet")
        get_uuid = getattr(self._lib, "cuDeviceGetUuid_v2", None)
        if get_uuid is not None:
            raw = (ctypes.c_ubyte * 16)()
            if get_uuid(ctypes.byref(raw), dev) == 0:
                return bytes(raw).hex()
        buf = ctypes.create_string_buffer(32)
        self._check(self._lib.cuDeviceGetPCIBusId(buf, len(buf), dev), "cuDeviceGetPCIBusId")
        return buf.value.decode().lower()

    def export(self, addr: int) -> tuple[bytes, int]:
        """(the handle of the allocation holding addr, addr's offset in it). One driver
        query per call (the allocation's process-wide unique id, its start, whether it can
        be shared this way); the handle itself is made once per allocation id."""
        buf_id, capable, start = ctypes.c_uint64(), ctypes.c_int(0), ctypes.c_uint64()
        data = (ctypes.c_void_p * 3)(ctypes.addressof(buf_id), ctypes.addressof(capable),
                                     ctypes.addressof(start))
        self._check(self._lib.cuPointerGetAttributes(3, _EXPORT_ATTRS, data,
                                                     ctypes.c_uint64(addr)),
                    "cuPointerGetAttributes")
        if not capable.value:
            raise CudaError(f"the allocation holding {addr:#x} cannot be shared by an IPC "
                            "handle (e.g. torch's expandable segments)")
        with self._lock:
            handle = self._exports.get(buf_id.value)
        if handle is None:
            h = Handle()
            self._check(self._lib.cuIpcGetMemHandle(ctypes.byref(h), start),
                        "cuIpcGetMemHandle")
            handle = bytes(h)
            with self._lock:
                if len(self._exports) >= EXPORT_CACHE:
                    self._exports.pop(next(iter(self._exports)))
                self._exports[buf_id.value] = handle
        return handle, addr - start.value

    def open(self, handle: bytes, device: int) -> int:
        """The base address of a peer's allocation in this process (opened once)."""
        key = (device, handle)
        with self._lock:
            base = self._opened.get(key)
            if base is not None:
                self._opened.move_to_end(key)
                return base
            ptr = ctypes.c_uint64()
            self._check(self._open_mem(ctypes.byref(ptr), Handle.of(handle),
                                       _LAZY_PEER_ACCESS), "cuIpcOpenMemHandle")
            self._opened[key] = ptr.value
            while len(self._opened) > OPEN_CACHE:
                (old_device, _), old = self._opened.popitem(last=False)
                self.generation += 1
                with contextlib.suppress(CudaError), self.on(old_device):
                    self._lib.cuCtxSynchronize()     # no queued work still reads it
                    self._lib.cuIpcCloseMemHandle(ctypes.c_uint64(old))
            return ptr.value

    def device_of(self, addr: int) -> int:
        """The ordinal of the device holding addr (in this process's numbering)."""
        out = ctypes.c_int()
        self._check(self._lib.cuPointerGetAttribute(ctypes.byref(out), _ATTR_DEVICE_ORDINAL,
                                                    ctypes.c_uint64(addr)),
                    "cuPointerGetAttribute")
        return out.value

    def touch(self, keys) -> None:
        """(device, handle) pairs of opened mappings just used again (without open): the
        cache closes the least recently used first."""
        with self._lock:
            for key in keys:
                if key in self._opened:
                    self._opened.move_to_end(key)

    def new_event(self) -> tuple[int, bytes]:
        """(an interprocess event of the current context, its handle). The caller destroys
        it (destroy_event)."""
        ev = ctypes.c_void_p()
        self._check(self._lib.cuEventCreate(ctypes.byref(ev), _EVENT_FLAGS), "cuEventCreate")
        h = Handle()
        try:
            self._check(self._lib.cuIpcGetEventHandle(ctypes.byref(h), ev), "cuIpcGetEventHandle")
        except CudaError:
            self._lib.cuEventDestroy_v2(ev)
            raise
        with self._lock:
            self._local_events[bytes(h)] = ev.value
        return ev.value, bytes(h)

    def local_event(self, handle: bytes) -> int:
        """The event behind a handle made by new_event in this process (CUDA refuses to
        open a process's own handles): a rank in the same process uses it directly."""
        with self._lock:
            return self._local_events[handle]

    def open_event(self, handle: bytes) -> int:
        """A peer's event in this process (the caller caches it and destroys it)."""
        out = ctypes.c_void_p()
        self._check(self._lib.cuIpcOpenEventHandle(ctypes.byref(out), Handle.of(handle)),
                    "cuIpcOpenEventHandle")
        return out.value

    def synchronize_event(self, event: int) -> None:
        """Wait (CPU) until the work before the event's last record has run."""
        self._check(self._lib.cuEventSynchronize(ctypes.c_void_p(event)), "cuEventSynchronize")

    def destroy_event(self, event: int) -> None:
        with self._lock:
            for h, ev in list(self._local_events.items()):
                if ev == event:
                    del self._local_events[h]
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
        """Close every opened memory handle (each in its device's context, once its queued
        work has run)."""
        with self._lock:
            opened, self._opened = list(self._opened.items()), OrderedDict()
            self.generation += 1
        for (device, _), base in opened:
            with contextlib.suppress(CudaError), self.on(device):
                self._lib.cuCtxSynchronize()
                self._lib.cuIpcCloseMemHandle(ctypes.c_uint64(base))


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
