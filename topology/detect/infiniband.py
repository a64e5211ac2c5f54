"""InfiniBand / RoCE devices from /sys/class/infiniband: ports with state and rate, the
NUMA node and PCIe path of the adapter, and its network interfaces (IPoIB or RoCE netdevs,
which is how a TCP transport reaches the same wire). Nothing on machines without them."""
from __future__ import annotations

import re

from .sysfs import list_dir, read_int, read_text, real_path

_IB = "/sys/class/infiniband"


def _rate_gbps(text: str | None) -> float | None:
    """"200 Gb/sec (4X HDR)" -> 200.0."""
    m = re.match(r"\s*([\d.]+)\s*Gb/sec", text or "")
    try:
        return float(m.group(1)) if m else None
    except ValueError:
        return None


def _state(text: str | None) -> str | None:
    """"4: ACTIVE" -> "ACTIVE"."""
    if not text:
        return None
    return text.split(":", 1)[-1].strip() or None


def probe_infiniband(root: str = "/") -> list[dict]:
    """One dict per device, sorted by name: name, numa_idx, pci_path, netdevs, ports
    [{"port", "state", "rate_gbps", "link_layer"}]; [] when there are none; never raises."""
    devices = []
    for name in list_dir(root, _IB):
        try:
            base = f"{_IB}/{name}"
            ports = []
            for port in list_dir(root, f"{base}/ports"):
                if not port.isdigit():
                    continue
                pbase = f"{base}/ports/{port}"
                ports.append({"port": int(port), "state": _state(read_text(root, f"{pbase}/state")),
                              "rate_gbps": _rate_gbps(read_text(root, f"{pbase}/rate")),
                              "link_layer": read_text(root, f"{pbase}/link_layer")})
            ports.sort(key=lambda p: p["port"])
            numa = read_int(root, f"{base}/device/numa_node")
            devices.append({"name": name, "numa_idx": numa if numa is not None and numa >= 0 else None,
                            "pci_path": real_path(root, f"{base}/device"),
                            "netdevs": list_dir(root, f"{base}/device/net"), "ports": ports})
        except Exception:  # a probe never raises: an odd device is left out
            continue
    return devices
