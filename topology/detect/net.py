"""Network interfaces: name, IPv4 addresses, speed, up/down, loopback, NUMA node, PCIe path.

Sources, per interface:
  - names: socket.if_nameindex() on a real machine, so a process sees the interfaces of
    its own network namespace even when /sys was mounted for another one (then the sysfs
    facts of a same-named interface are ignored: its ifindex differs); a fake root lists
    /sys/class/net instead;
  - /sys/class/net/IF/{operstate, flags, type, speed, ifindex, device/numa_node, device}:
    speed is in Mbit/s and reads -1 or fails (EINVAL) for virtual links; that gives None;
  - IPv4 address and prefix: ioctl SIOCGIFADDR / SIOCGIFNETMASK (the primary address of
    each interface; sysfs has no addresses), only for the real root; tests pass them in;
  - /proc/net/route: which interface carries the default route;
  - the shaped rate of a tbf root qdisc (topology/detect/qdisc.py), because an emulated
    link (veth + `tc ... tbf rate 1gbit`) reports the veth's 10000 Mbit/s in sysfs.
"""
from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct

from . import qdisc
from .sysfs import list_dir, read_int, read_text, real_path

_NET = "/sys/class/net"
_IFF_UP = 0x1
_IFF_LOOPBACK = 0x8
_ARPHRD = {1: "ethernet", 32: "infiniband", 772: "loopback"}
_SIOCGIFADDR = 0x8915
_SIOCGIFNETMASK = 0x891B


def ipv4_of(name: str) -> list[str]:
    """["a.b.c.d/len"] for the primary IPv4 address of interface `name`, [] when none."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            req = struct.pack("256s", name.encode()[:15])
            addr = socket.inet_ntoa(fcntl.ioctl(s.fileno(), _SIOCGIFADDR, req)[20:24])
            mask = socket.inet_ntoa(fcntl.ioctl(s.fileno(), _SIOCGIFNETMASK, req)[20:24])
        return [str(ipaddress.IPv4Interface(f"{addr}/{mask}"))]
    except (OSError, ValueError, UnicodeError):
        return []


def _default_route_ifaces(root: str) -> set[str]:
    """Interfaces with a 0.0.0.0/0 route in /proc/net/route (hex columns, header first)."""
    out = set()
    for line in (read_text(root, "/proc/net/route") or "").splitlines()[1:]:
        cols = line.split()
        if len(cols) >= 8 and cols[1] == "00000000" and cols[7] == "00000000":
            out.add(cols[0])
    return out


def _interface_names(root: str) -> list[tuple[str, int | None]]:
    if root == "/":
        try:
            return sorted((name, idx) for idx, name in socket.if_nameindex())
        except OSError:
            pass
    return [(name, None) for name in list_dir(root, _NET)]


def probe_nics(root: str = "/", addresses: dict | None = None) -> list[dict]:
    """One dict per interface, sorted by name: name, kind, addresses ["a.b.c.d/len"],
    speed_mbps, shaped_mbps, is_up, is_loopback, is_default_route, numa_idx, pci_path.
    `addresses` (name -> list) replaces the ioctl, for fake roots; never raises."""
    nics = []
    default_ifaces = _default_route_ifaces(root)
    shaped = qdisc.shaped_rates() if root == "/" else {}
    for name, ifindex in _interface_names(root):
        try:
            nics.append(_probe_one(root, name, ifindex, addresses, default_ifaces, shaped))
        except Exception:  # a probe never raises: an odd interface is left out
            continue
    return nics


def _probe_one(root, name, ifindex, addresses, default_ifaces, shaped) -> dict:
    base = f"{_NET}/{name}"
    sysfs_ok = ifindex is None or read_int(root, f"{base}/ifindex") == ifindex
    get_text = (lambda rel: read_text(root, f"{base}/{rel}")) if sysfs_ok else (lambda rel: None)
    get_int = (lambda rel, b=10: read_int(root, f"{base}/{rel}", b)) if sysfs_ok else (
        lambda rel, b=10: None)
    flags = get_int("flags", 16)
    arphrd = get_int("type")
    operstate = get_text("operstate")
    is_loopback = bool(flags is not None and flags & _IFF_LOOPBACK) or arphrd == 772
    is_up = operstate == "up" or (operstate in (None, "unknown") and flags is not None
                                   and bool(flags & _IFF_UP))
    speed = get_int("speed")
    numa = get_int("device/numa_node")
    if addresses is not None:
        addrs = list(addresses.get(name, []))
    elif root == "/":
        addrs = ipv4_of(name)
    else:
        addrs = []
    return {
        "name": name,
        "kind": "loopback" if is_loopback else _ARPHRD.get(arphrd, "other"),
        "addresses": addrs,
        "speed_mbps": speed if speed is not None and speed > 0 else None,
        "shaped_mbps": shaped.get(ifindex),
        "is_up": is_up,
        "is_loopback": is_loopback,
        "is_default_route": name in default_ifaces,
        "numa_idx": numa if numa is not None and numa >= 0 else None,
        "pci_path": real_path(root, f"{base}/device") if sysfs_ok else None,
    }
