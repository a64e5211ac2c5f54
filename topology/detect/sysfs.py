"""Small readers shared by the probes. Every path is taken relative to a `root` directory
("/" on a real machine, a temporary tree in tests), and every reader returns None on any
problem (missing file, permission, garbage), because a probe must never raise: a fact we
cannot read is a fact we do not know."""
from __future__ import annotations

import os


def path(root: str, rel: str) -> str:
    """`rel` (an absolute-looking path such as "/sys/class/net") under `root`."""
    return os.path.join(root, rel.lstrip("/"))


def read_text(root: str, rel: str) -> str | None:
    try:
        with open(path(root, rel), errors="replace") as f:
            return f.read().strip()
    except (OSError, ValueError):
        return None


def read_int(root: str, rel: str, base: int = 10) -> int | None:
    text = read_text(root, rel)
    if text is None:
        return None
    try:
        return int(text.split()[0], base) if text else None
    except ValueError:
        return None


def list_dir(root: str, rel: str) -> list[str]:
    try:
        return sorted(os.listdir(path(root, rel)))
    except OSError:
        return []


def real_path(root: str, rel: str) -> str | None:
    """Where a sysfs link points, relative to `root` ("/sys/devices/pci0000:00/..."),
    or None when it is not a link or does not resolve."""
    full = path(root, rel)
    if not os.path.islink(full):
        return None
    try:
        target = os.path.realpath(full)
    except OSError:
        return None
    base = os.path.realpath(root)
    if base != "/" and target.startswith(base + os.sep):
        target = target[len(base):]
    return target


def parse_cpulist(text: str | None) -> list[int] | None:
    """The kernel's cpulist format ("0-3,8,10-11") as a sorted list; None if garbled."""
    if text is None:
        return None
    cpus: set[int] = set()
    text = text.strip()
    if not text:
        return []
    try:
        for part in text.split(","):
            lo, dash, hi = part.strip().partition("-")
            first, last = int(lo), int(hi) if dash else int(lo)
            if first < 0 or last < first or last - first > 1 << 16:
                return None
            cpus.update(range(first, last + 1))
    except ValueError:
        return None
    return sorted(cpus)


def format_cpulist(cpus) -> str:
    """The inverse of parse_cpulist: [0, 1, 2, 5] -> "0-2,5" (compact in JSON too)."""
    out: list[str] = []
    ordered = sorted(set(cpus))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        out.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(out)
