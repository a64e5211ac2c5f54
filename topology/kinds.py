"""PathKind: how two ranks are connected, with the short labels and the legend that
`topocomm topo` prints (topology/describe.py) and the model (topology/model.py) uses."""
from __future__ import annotations

import enum


class PathKind(enum.IntEnum):
    """How two ranks are connected; smaller = closer (see the module docstring)."""
    SELF = 0
    SAME_GPU = 1
    NVLINK = 2
    PCIE = 3
    SAME_SOCKET = 4
    SAME_HOST = 5
    SAME_SWITCH = 6
    NETWORK = 7

    @property
    def label(self) -> str:
        return LABELS[self]


LABELS = {PathKind.SELF: "X", PathKind.SAME_GPU: "GPU", PathKind.NVLINK: "NV",
          PathKind.PCIE: "PCI", PathKind.SAME_SOCKET: "SOC", PathKind.SAME_HOST: "HOST",
          PathKind.SAME_SWITCH: "SW", PathKind.NETWORK: "NET"}
LEGEND = {PathKind.SELF: "the same rank",
          PathKind.SAME_GPU: "two ranks on one GPU (CUDA IPC)",
          PathKind.NVLINK: "NVLink between the ranks' GPUs (NV# = number of links)",
          PathKind.PCIE: "GPUs under one PCIe root port, no NVLink",
          PathKind.SAME_SOCKET: "same host, same CPU socket (shared memory)",
          PathKind.SAME_HOST: "same host, across sockets or placement unknown",
          PathKind.SAME_SWITCH: "other host, NICs on one IPv4 subnet",
          PathKind.NETWORK: "other host, routed or no NIC known"}
