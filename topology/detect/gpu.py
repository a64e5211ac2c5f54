"""NVIDIA GPUs through NVML (ctypes on libnvidia-ml.so.1, no Python package needed):
name, UUID, PCI bus id, NVLink peers, the PCIe distance between GPUs, and from sysfs the
NUMA node and PCIe path of each GPU. On a machine without the driver this returns [].

NVLink: each active link leads to another GPU (counted per peer) or to an NVSwitch (counted
under "nvswitch"; every GPU on the switch reaches every other one). PCIe distance is NVML's
common-ancestor level between two GPUs, by name: "internal" (one board), "single" (one PCIe
switch), "multiple" (several switches), "hostbridge" (one CPU root port), "node" (one NUMA
node, across host bridges), "system" (across the CPU interconnect).
"""
from __future__ import annotations

import ctypes
import os

from .sysfs import read_int, real_path

NVLINK_MAX_LINKS = 18  # NVML_NVLINK_MAX_LINKS in nvml.h (H100: 18 links per GPU)
PCIE_LEVELS = {0: "internal", 10: "single", 20: "multiple", 30: "hostbridge",
               40: "node", 50: "system"}


class _PciInfo(ctypes.Structure):
    """nvmlPciInfo_t as filled by nvmlDeviceGetPciInfo_v3 / ...RemotePciInfo_v2."""
    _fields_ = [("busIdLegacy", ctypes.c_char * 16), ("domain", ctypes.c_uint),
                ("bus", ctypes.c_uint), ("device", ctypes.c_uint),
                ("pciDeviceId", ctypes.c_uint), ("pciSubSystemId", ctypes.c_uint),
                ("busId", ctypes.c_char * 32)]


class Nvml:
    """The few NVML queries the probe needs. Tests substitute an object with the same
    methods (count, name, uuid, bus_id, nvlink_remote_bus_ids, common_ancestor, close)."""

    def __init__(self, lib):
        self._lib = lib
        self._handles: dict = {}

    @classmethod
    def open(cls) -> "Nvml | None":
        try:
            lib = ctypes.CDLL("libnvidia-ml.so.1")
            if lib.nvmlInit_v2() != 0:
                return None
        except (OSError, AttributeError):
            return None
        return cls(lib)

    def _handle(self, idx: int):
        if idx not in self._handles:
            handle = ctypes.c_void_p()
            if self._lib.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(idx), ctypes.byref(handle)):
                raise OSError(f"nvml: no handle for GPU {idx}")
            self._handles[idx] = handle
        return self._handles[idx]

    def count(self) -> int:
        n = ctypes.c_uint()
        return n.value if self._lib.nvmlDeviceGetCount_v2(ctypes.byref(n)) == 0 else 0

    def _text(self, fn, idx) -> str | None:
        buf = ctypes.create_string_buffer(96)
        if fn(self._handle(idx), buf, ctypes.c_uint(len(buf))) != 0:
            return None
        return buf.value.decode(errors="replace")

    def name(self, idx: int) -> str | None:
        return self._text(self._lib.nvmlDeviceGetName, idx)

    def uuid(self, idx: int) -> str | None:
        return self._text(self._lib.nvmlDeviceGetUUID, idx)

    def bus_id(self, idx: int) -> str | None:
        pci = _PciInfo()
        if self._lib.nvmlDeviceGetPciInfo_v3(self._handle(idx), ctypes.byref(pci)) != 0:
            return None
        return pci.busId.decode(errors="replace")

    def nvlink_remote_bus_ids(self, idx: int) -> list[str]:
        """The bus id at the far end of each active NVLink of GPU `idx`."""
        out = []
        for link in range(NVLINK_MAX_LINKS):
            active = ctypes.c_int()
            if self._lib.nvmlDeviceGetNvLinkState(self._handle(idx), ctypes.c_uint(link),
                                                  ctypes.byref(active)) != 0 or not active.value:
                continue
            pci = _PciInfo()
            if self._lib.nvmlDeviceGetNvLinkRemotePciInfo_v2(
                    self._handle(idx), ctypes.c_uint(link), ctypes.byref(pci)) == 0:
                out.append(pci.busId.decode(errors="replace"))
        return out

    def common_ancestor(self, a: int, b: int) -> int | None:
        level = ctypes.c_int()
        if self._lib.nvmlDeviceGetTopologyCommonAncestor(self._handle(a), self._handle(b),
                                                         ctypes.byref(level)) != 0:
            return None
        return level.value

    def close(self) -> None:
        try:
            self._lib.nvmlShutdown()
        except (OSError, AttributeError):
            pass


def sysfs_bus_id(nvml_bus_id: str | None) -> str | None:
    """NVML's "00000000:1B:00.0" as sysfs names it, "0000:1b:00.0"; None if garbled."""
    if not nvml_bus_id:
        return None
    domain, sep, rest = nvml_bus_id.strip().partition(":")
    try:
        return f"{int(domain, 16):04x}:{rest.lower()}" if sep and rest else None
    except ValueError:
        return None


def probe_gpus(root: str = "/", nvml=None) -> list[dict]:
    """One dict per GPU in NVML order: gpu_idx, name, uuid, bus_id, numa_idx, pci_path,
    nvlinks {"<peer gpu_idx>" or "nvswitch": number of links}, pcie {"<peer gpu_idx>":
    level name}. [] without NVML; never raises."""
    own = nvml is None
    if own:
        nvml = Nvml.open()
        if nvml is None:
            return []
    try:
        return _probe(root, nvml)
    except Exception:  # a probe never raises: a driver that misbehaves means no GPU facts
        return []
    finally:
        if own:
            nvml.close()


def _probe(root, nvml) -> list[dict]:
    num_gpus = nvml.count()
    bus_ids = [sysfs_bus_id(nvml.bus_id(i)) for i in range(num_gpus)]
    gpu_of_bus = {b: i for i, b in enumerate(bus_ids) if b}
    gpus = []
    for i in range(num_gpus):
        nvlinks: dict = {}
        for remote in nvml.nvlink_remote_bus_ids(i):
            peer = gpu_of_bus.get(sysfs_bus_id(remote))
            key = "nvswitch" if peer is None else str(peer)
            nvlinks[key] = nvlinks.get(key, 0) + 1
        pcie = {}
        for j in range(num_gpus):
            level = nvml.common_ancestor(i, j) if j != i else None
            if level in PCIE_LEVELS:
                pcie[str(j)] = PCIE_LEVELS[level]
        bus = bus_ids[i]
        numa = read_int(root, f"/sys/bus/pci/devices/{bus}/numa_node") if bus else None
        gpus.append({"gpu_idx": i, "name": nvml.name(i), "uuid": nvml.uuid(i), "bus_id": bus,
                     "numa_idx": numa if numa is not None and numa >= 0 else None,
                     "pci_path": real_path(root, f"/sys/bus/pci/devices/{bus}") if bus else None,
                     "nvlinks": nvlinks, "pcie": pcie})
    return gpus


def visible_gpus(gpus: list[dict], cuda_visible: str | None) -> list[int]:
    """gpu_idx of the GPUs this process may use, in CUDA's order: CUDA_VISIBLE_DEVICES
    (indices or UUID prefixes) when set, else all of them."""
    if cuda_visible is None:
        return [g["gpu_idx"] for g in gpus]
    out = []
    for item in cuda_visible.split(","):
        item = item.strip()
        if not item:
            break
        if item.lstrip("-").isdigit():
            idx = int(item)
            if idx < 0 or idx >= len(gpus):
                break  # CUDA stops at the first invalid entry
            out.append(gpus[idx]["gpu_idx"])
            continue
        match = [g["gpu_idx"] for g in gpus if g.get("uuid") and g["uuid"].startswith(item)]
        if len(match) != 1:
            break
        out.append(match[0])
    return out


MPS_DEFAULT_PIPE_DIR = "/tmp/nvidia-mps"


def mps_active(environ=None, root: str = "/") -> bool:
    """Whether an MPS control daemon serves this process's GPUs: its control pipe exists in
    CUDA_MPS_PIPE_DIRECTORY (default /tmp/nvidia-mps). CUDA then connects every process as
    a client, so kernels of different processes on one GPU run at once instead of taking
    turns (time slices)."""
    env = os.environ if environ is None else environ
    pipe_dir = env.get("CUDA_MPS_PIPE_DIRECTORY") or MPS_DEFAULT_PIPE_DIR
    return os.path.exists(os.path.join(root, pipe_dir.lstrip("/"), "control"))
