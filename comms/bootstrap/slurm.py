"""Slurm host lists (SLURM_NODELIST, SLURM_STEP_NODELIST, SLURM_JOB_NODELIST), expanded by
Slurm's rules:

    node[01-04]           node01 node02 node03 node04   (a range keeps the zero padding of
                                                          its lower bound)
    gpu[1,3-5],cpu7       gpu1 gpu3 gpu4 gpu5 cpu7      (comma lists inside and outside
                                                          brackets)
    rack[1-2]-node[01-02] rack1-node01 rack1-node02 rack2-node01 rack2-node02
                                                         (several bracket groups: the last
                                                          varies fastest)

Hosts are produced lazily, so first_host() of a huge range costs nothing.
"""
from __future__ import annotations

import re
from collections.abc import Iterator

_SPAN = re.compile(r"^(\d+)(?:-(\d+))?$")


def _split_top(text: str, what: str) -> list[str]:
    """The comma-separated items of `text`, commas inside brackets kept."""
    items, cur, depth = [], [], 0
    for ch in text:
        if ch == "[":
            if depth:
                raise ValueError(f"{what}: nested '[' in {text!r}")
            depth = 1
        elif ch == "]":
            if not depth:
                raise ValueError(f"{what}: ']' without '[' in {text!r}")
            depth = 0
        if ch == "," and not depth:
            items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise ValueError(f"{what}: '[' without ']' in {text!r}")
    items.append("".join(cur))
    return [item.strip() for item in items if item.strip()]


def _spans(group: str, what: str, text: str) -> list[tuple[int, int, int]]:
    """(low, high, width) of each comma-separated number or range inside one bracket."""
    spans = []
    for part in group.split(","):
        m = _SPAN.match(part.strip())
        if not m:
            raise ValueError(f"{what}: {part.strip()!r} in [{group}] of {text!r} is not a "
                             "number or a range lo-hi")
        low_text, high_text = m.group(1), m.group(2) or m.group(1)
        low, high = int(low_text), int(high_text)
        if high < low:
            raise ValueError(f"{what}: range {part.strip()!r} in {text!r} goes down")
        spans.append((low, high, len(low_text)))
    return spans


def _expand_item(item: str, what: str, text: str) -> Iterator[str]:
    parts: list = []   # str (literal) or list of spans (a bracket group)
    for piece in re.split(r"(\[[^\]]*\])", item):
        if piece.startswith("["):
            parts.append(_spans(piece[1:-1], what, text))
        elif piece:
            parts.append(piece)

    def product(i: int) -> Iterator[str]:
        if i == len(parts):
            yield ""
            return
        part = parts[i]
        heads = [part] if isinstance(part, str) else (
            f"{n:0{width}d}" for low, high, width in part for n in range(low, high + 1))
        for head in heads:
            for tail in product(i + 1):
                yield head + tail
    return product(0)


def iter_nodelist(text: str, what: str = "SLURM_NODELIST") -> Iterator[str]:
    """The host names of Slurm host list `text`, in order, one at a time. Raises ValueError
    naming `what` (the variable it came from) for a malformed list."""
    items = _split_top(text, what)   # checks the brackets before anything is produced
    for item in items:
        yield from _expand_item(item, what, text)


def expand_nodelist(text: str, what: str = "SLURM_NODELIST") -> list[str]:
    """Every host name of Slurm host list `text`, in order (see the module docstring).
    ValueError naming `what` for a malformed list."""
    return list(iter_nodelist(text, what))


def first_host(text: str, what: str = "SLURM_NODELIST") -> str:
    """The first host name of Slurm host list `text`; ValueError naming `what` when the
    list is malformed or empty."""
    for host in iter_nodelist(text, what):
        return host
    raise ValueError(f"{what}: no host in {text!r}")
