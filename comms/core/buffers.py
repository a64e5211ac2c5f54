"""Buf: one buffer as every layer below the API sees it, whatever object it came from.

A Buf is plain data: where the bytes are (addr), how many elements of which dtype code
(comms/core/dtypes.py), which memory holds them (kind: "host" or "cuda", with the device
index), the stream its producer queued work on (CUDA only: the collective is ordered after
it), and the user's object it came from (owner), which the Buf keeps alive.
comms/api/buffers.py builds Bufs from numpy arrays, torch tensors, DLPack and
__cuda_array_interface__ objects, and checks them; the algorithms read only these fields.
"""
from __future__ import annotations

from dataclasses import dataclass

from comms.core import dtypes as dt

HOST = "host"   # CPU memory, readable by address in this process
CUDA = "cuda"   # device memory of one GPU (device = its index)
MEMORY_KINDS = (HOST, CUDA)


@dataclass
class Buf:
    addr: int
    count: int
    dtype: int
    obj: object                 # the owner: the user's array or tensor (None for internal memory)
    kind: str = HOST
    device: int | None = None   # CUDA device index (None for host memory)
    stream: int | None = None   # CUDA stream handle the producer used (None: the default stream)

    @property
    def nbytes(self) -> int:
        return self.count * dt.DTYPE_SIZES[self.dtype]

    @property
    def is_host(self) -> bool:
        return self.kind == HOST

    def where(self) -> str:
        """'host', or 'cuda:<device>'."""
        return self.kind if self.device is None else f"{self.kind}:{self.device}"
