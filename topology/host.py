"""Host identity: two ranks share a host (and so shared memory) when hostname, boot id and
network-namespace inode all agree. Ranks in different network namespaces of one machine
are different hosts, exactly as on a real cluster. TOPOCOMM_HOST_ID overrides.
host_identity() returns the parts separately (for topology/detect's local view)."""
from __future__ import annotations

import os
import socket

from . import env


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def host_id() -> str:
    forced = env.get("TOPOCOMM_HOST_ID")
    if forced:
        return forced
    try:
        netns = str(os.stat("/proc/self/ns/net").st_ino)
    except OSError:
        netns = "?"
    boot = _read("/proc/sys/kernel/random/boot_id") or "?"
    return f"{socket.gethostname()}/{boot}/{netns}"


def local_facts() -> dict:
    """Facts about this process's placement, cheap to gather (no probing)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = []
    return {"host_id": host_id(), "hostname": socket.gethostname(), "pid": os.getpid(),
            "cpus": cpus, "num_cpus": os.cpu_count() or 1}


def host_identity(root: str = "/") -> dict:
    """The parts of host_id() separately: host_id, hostname, boot_id, netns (inode), and
    whether TOPOCOMM_HOST_ID set it. With a `root` other than "/" (tests) the same files
    are read under that directory. Never raises."""
    forced = env.get("TOPOCOMM_HOST_ID")
    if root == "/":
        hostname = socket.gethostname()
    else:
        hostname = _read(os.path.join(root, "proc/sys/kernel/hostname")) or "?"
    boot = _read(os.path.join(root, "proc/sys/kernel/random/boot_id")) or "?"
    try:
        netns = str(os.stat(os.path.join(root, "proc/self/ns/net")).st_ino)
    except OSError:
        netns = "?"
    return {"host_id": forced or f"{hostname}/{boot}/{netns}", "hostname": hostname,
            "boot_id": boot, "netns": netns, "is_host_id_forced": forced is not None}
