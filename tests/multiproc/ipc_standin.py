"""A stand-in for CUDA IPC between processes, on host memory (imported by the ranks of
tests/multiproc/test_device_ipc_procs.py): "device" arrays live in files of /dev/shm that a
peer maps when it opens their handle (the handle names the file, as a CUDA handle names an
allocation), events are no-ops (every "kernel" runs at once), the kernels are the torch
fold on CPU tensors. What it checks that threads cannot: handles travel between processes,
are opened (and cached) there, and the ranks' own addresses never cross."""
import atexit
import contextlib
import ctypes
import mmap
import os
import uuid

import numpy as np

_SEGMENTS = {}          # base address -> (name, size)
PAD = 256               # the array starts this far into its segment (as a tensor does in an
                        # allocation of the caching allocator): handles travel with offsets


class ShmDevice:
    """A "cuda" array whose bytes are a /dev/shm file this process created."""

    def __init__(self, values, dtype=np.float32):
        arr = np.asarray(values, dtype)
        self.name = f"tc-ipc-test-{uuid.uuid4().hex}"
        size = PAD + max(arr.nbytes, 1)
        fd = os.open(f"/dev/shm/{self.name}", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        os.ftruncate(fd, size)
        self.map = mmap.mmap(fd, size)
        os.close(fd)
        self.host = np.frombuffer(self.map, np.uint8, arr.nbytes, PAD).view(arr.dtype) \
            .reshape(arr.shape)
        self.host[...] = arr
        base = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        _SEGMENTS[base] = (self.name, size)
        self.__cuda_array_interface__ = {"data": (base + PAD, False), "shape": arr.shape,
                                         "typestr": arr.dtype.str, "strides": None,
                                         "version": 3, "stream": 7}
        self.device = type("Device", (), {"id": 0})()

    def unlink(self):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"/dev/shm/{self.name}")


class ShmIpc:
    """comms/transport/cuda_ipc.py DriverIpc's methods on /dev/shm files."""
    name = "shm stand-in"
    generation = 0

    def __init__(self, gpu="gpu-0"):
        self.gpu = gpu
        self.opened = {}         # name -> (mmap, base)
        self.opens = 0
        self.events = 0

    @contextlib.contextmanager
    def on(self, device):
        yield

    def gpu_id(self, device):
        return self.gpu

    def device_of(self, addr):
        return 0

    def export(self, addr):
        for base, (name, size) in _SEGMENTS.items():
            if base <= addr < base + size:
                return name.encode().ljust(64, b"\0"), addr - base
        raise RuntimeError(f"{addr:#x} is not in a shared segment")

    def open(self, handle, device):
        name = handle.rstrip(b"\0").decode()
        have = self.opened.get(name)
        if have is None:
            fd = os.open(f"/dev/shm/{name}", os.O_RDWR)
            m = mmap.mmap(fd, os.fstat(fd).st_size)
            os.close(fd)
            have = self.opened[name] = (m, ctypes.addressof(ctypes.c_char.from_buffer(m)))
            self.opens += 1
        return have[1]

    def touch(self, keys):
        pass

    def new_event(self):
        self.events += 1
        return self.events, f"{os.getpid()}:{self.events}".encode().ljust(64, b"\0")

    def open_event(self, handle):
        return handle

    def local_event(self, handle):
        raise AssertionError("no two ranks share a process here")

    def record(self, event, stream):
        pass

    def wait(self, stream, event):
        pass

    def synchronize_event(self, event):
        pass

    def destroy_event(self, event):
        pass


class CountingCopies:
    """comms/kernels/device_copy.py's engine methods on host memory, counting the copies
    (the staged path's): none is expected when every call runs by IPC."""
    name = "counting"

    def __init__(self):
        self.copies = 0

    def host_array(self, nbytes):
        return np.zeros(nbytes, np.uint8)

    def to_host(self, host, buf, offset=0):
        self.copies += 1
        ctypes.memmove(host.ctypes.data, buf.addr + offset, host.nbytes)

    def to_device(self, buf, host, offset=0):
        self.copies += 1
        ctypes.memmove(buf.addr + offset, host.ctypes.data, host.nbytes)


def install(gpu="gpu-0"):
    """Put the stand-ins in place of this process's IPC runtime, kernels and copy engine;
    returns (ipc, copy engine)."""
    import torch

    from comms.kernels import cuda, device_copy
    from comms.transport import cuda_ipc

    class Kernels(cuda.TorchKernels):
        name = "stand-in"

        def __init__(self):
            super().__init__(torch, "cpu")

        def alloc(self, nbytes, device, stream):
            """Scratch "device" memory peers can map: a /dev/shm file (removed at exit)."""
            d = ShmDevice(np.zeros(nbytes, np.uint8), np.uint8)
            atexit.register(d.unlink)
            return d, d.__cuda_array_interface__["data"][0]
    ipc, copies = ShmIpc(gpu), CountingCopies()
    cuda_ipc._opened = ipc
    cuda._chosen = Kernels()
    device_copy._chosen = copies
    return ipc, copies
