"""The rate of a token-bucket (tbf) root qdisc per interface, read over rtnetlink.

Why: the emulated cluster shapes veth links with `tc qdisc add dev IF root tbf rate 1gbit`,
and sysfs still reports the veth's nominal 10000 Mbit/s; the shaped rate is what a
transfer gets. One RTM_GETQDISC dump (what `tc qdisc show` sends) lists every qdisc of this
network namespace; we keep the root tbf ones. Nothing here raises: any failure gives {}.
"""
from __future__ import annotations

import socket
import struct

_RTM_NEWQDISC, _RTM_GETQDISC = 36, 38
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_TC_H_ROOT = 0xFFFFFFFF
_TCA_KIND, _TCA_OPTIONS = 1, 2
_TCA_TBF_PARMS, _TCA_TBF_RATE64 = 1, 4
_NLMSG_HDR = struct.Struct("=IHHII")     # len, type, flags, seq, pid
_TCMSG = struct.Struct("=BxxxiIII")      # family, ifindex, handle, parent, info

def _attrs(data: bytes):
    """(type, payload) of each rtattr in `data` (4-byte aligned, nested flag masked)."""
    at = 0
    while at + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, at)
        if length < 4:
            return
        yield kind & 0x3FFF, data[at + 4:at + length]
        at += (length + 3) & ~3


def _parse(messages: bytes, out: dict) -> bool:
    """Fill ifindex -> Mbit/s from one recv buffer; True when the dump is complete."""
    at = 0
    while at + _NLMSG_HDR.size <= len(messages):
        length, kind, _, _, _ = _NLMSG_HDR.unpack_from(messages, at)
        if length < _NLMSG_HDR.size:
            return True
        body = messages[at + _NLMSG_HDR.size:at + length]
        at += (length + 3) & ~3
        if kind in (_NLMSG_DONE, _NLMSG_ERROR):
            return True
        if kind != _RTM_NEWQDISC or len(body) < _TCMSG.size:
            continue
        _, ifindex, _, parent, _ = _TCMSG.unpack_from(body)
        attrs = dict(_attrs(body[_TCMSG.size:]))
        if parent != _TC_H_ROOT or attrs.get(_TCA_KIND, b"").rstrip(b"\0") != b"tbf":
            continue
        options = dict(_attrs(attrs.get(_TCA_OPTIONS, b"")))
        bytes_per_s = None
        if len(options.get(_TCA_TBF_RATE64, b"")) >= 8:
            bytes_per_s = struct.unpack_from("=Q", options[_TCA_TBF_RATE64])[0]
        elif len(options.get(_TCA_TBF_PARMS, b"")) >= 12:
            # struct tc_tbf_qopt starts with struct tc_ratespec, whose u32 rate is at byte 8
            bytes_per_s = struct.unpack_from("=I", options[_TCA_TBF_PARMS], 8)[0]
        if bytes_per_s:
            out[ifindex] = int(round(bytes_per_s * 8 / 1e6))
    return False


def shaped_rates() -> dict:
    """ifindex -> rate in Mbit/s of each interface whose root qdisc is tbf."""
    out: dict = {}
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as s:
            s.settimeout(1.0)
            request = _TCMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
            header = _NLMSG_HDR.pack(_NLMSG_HDR.size + len(request), _RTM_GETQDISC,
                                     _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0)
            s.send(header + request)
            for _ in range(10000):  # bounded: a dump ends with NLMSG_DONE
                if _parse(s.recv(1 << 16), out):
                    break
    except (OSError, AttributeError, struct.error):
        return {}
    return out

