"""The TOPOCOMM_* environment variables, each parsed and checked in this one place.

It sits on the ground floor (topology/) so that detection and every layer of comms read the
same values the same way: `env.get(name)` returns the parsed value, or the default when the
variable is unset or empty; a value it cannot take is a ValueError that names the variable
and says what it accepts. Nothing is read at import time. README.md's table describes each.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable

# The largest timeout accepted (about 31 years). Longer waits overflow the clocks that
# threading and socket timeouts use; anything that large means "wait for ever" anyway.
MAX_TIMEOUT_S = 1e9
MAX_STREAMS = 64

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
_IFNAME_ITEM = re.compile(r"^[\^=]?[A-Za-z0-9_.:@-]+$")
_ALGO_ITEM = re.compile(r"^\s*[A-Za-z_]+\s*:\s*[A-Za-z_-]+\s*$")


@dataclass(frozen=True)
class Variable:
    parse: Callable[[str], Any]   # the set text -> value; ValueError (any text) if invalid
    default: Any
    accepts: str                  # what the error message says it accepts


def _flag(text: str) -> bool:
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError


def _seconds(text: str) -> float:
    value = float(text.strip())
    if not (0 < value <= MAX_TIMEOUT_S):    # also refuses nan; inf is above the limit
        raise ValueError
    return value


def _streams(text: str) -> int:
    value = int(text.strip())
    if not 1 <= value <= MAX_STREAMS:
        raise ValueError
    return value


def _mebibytes(text: str) -> float:
    value = float(text.strip())
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError
    return value


def _milliseconds(text: str) -> float:
    value = float(text.strip())
    if not (0 < value < math.inf):
        raise ValueError
    return value


def _debug_level(text: str) -> str:
    level = text.strip().upper()
    if level == "WARNING":
        level = "WARN"
    if level not in ("WARN", "INFO", "TRACE"):
        raise ValueError
    return "WARNING" if level == "WARN" else level


def _cma(text: str) -> str:
    low = text.strip().lower()
    if low in ("auto", "1", "on"):
        return "auto"
    if low in ("0", "off", "no", "false"):
        return "off"
    raise ValueError


def _cuda_path(text: str) -> str:
    low = text.strip().lower()
    if low not in ("auto", "staged"):
        raise ValueError
    return low


def _algo(text: str) -> tuple:
    """((collective, algorithm), ...), lower case, in the order given; the names are
    checked against the algorithm tables by comms/plan/select.py."""
    out = []
    for part in text.replace(",", ";").split(";"):
        if not part.strip():
            continue
        if not _ALGO_ITEM.match(part):
            raise ValueError
        coll, algo = (x.strip().lower() for x in part.split(":", 1))
        out.append((coll, algo))
    return tuple(out)


def _ifnames(text: str) -> str:
    items = [x.strip() for x in text.split(",")]
    if not all(_IFNAME_ITEM.match(x) for x in items):
        raise ValueError
    return ",".join(items)


def _text(text: str) -> str:
    if not text.strip():
        raise ValueError
    return text


VARIABLES: dict[str, Variable] = {
    "TOPOCOMM_PURE_PYTHON": Variable(_flag, False, "1/true/yes/on or 0/false/no/off"),
    "TOPOCOMM_ALGO": Variable(
        _algo, (), "collective:algorithm items separated by ';' or ',' "
        "(e.g. 'allreduce:ring;alltoall:pairwise')"),
    "TOPOCOMM_CMA": Variable(_cma, "auto", "auto (or 1/on), or 0/off"),
    "TOPOCOMM_CUDA_PATH": Variable(_cuda_path, "auto", "auto (CUDA IPC on one host where every "
                                   "rank can map its buffers) or staged (through host memory)"),
    "TOPOCOMM_TIMEOUT": Variable(_seconds, None, f"seconds, a number in (0, {MAX_TIMEOUT_S:g}]"),
    "TOPOCOMM_HOST_ID": Variable(_text, None, "any non-blank text"),
    "TOPOCOMM_SOCKET_IFNAME": Variable(
        _ifnames, None, "interface names or prefixes, comma-separated, '^' to exclude, '=' "
        "for an exact name (e.g. 'eth,ib' or '^docker,lo')"),
    "TOPOCOMM_SOCKET_NSTREAMS": Variable(_streams, None, f"an integer from 1 to {MAX_STREAMS}"),
    "TOPOCOMM_TOPO_FILE": Variable(_text, None, "a file path"),
    "TOPOCOMM_TOPO_DUMP_FILE": Variable(_text, None, "a file path"),
    "TOPOCOMM_MOE_CACHE_MB": Variable(_mebibytes, None, "a number of MiB >= 0 (0 = off)"),
    "TOPOCOMM_PROBE": Variable(_flag, False, "1/true/yes/on or 0/false/no/off"),
    "TOPOCOMM_PROBE_CACHE": Variable(_text, None, "a folder path"),
    "TOPOCOMM_CALIBRATE": Variable(_flag, None, "1/true/yes/on (measure when this machine "
                                   "has no calibration) or 0/false/no/off (ignore it)"),
    "TOPOCOMM_STRAGGLER_WARN": Variable(_milliseconds, None, "milliseconds, a number > 0"),
    "TOPOCOMM_DEBUG": Variable(_debug_level, None, "WARN, INFO or TRACE"),
    "TOPOCOMM_DEBUG_FILE": Variable(_text, None, "a file path (%h: host, %p: pid)"),
}


def get(name: str, environ=None):
    """The parsed value of `name` (one of VARIABLES) in `environ` (default os.environ), or
    its default when unset or empty. Raises ValueError naming the variable when invalid."""
    var = VARIABLES[name]
    text = (os.environ if environ is None else environ).get(name)
    if text is None or text == "":
        return var.default
    return parse(name, text)


def check_all(environ=None) -> list:
    """Parse every TOPOCOMM_* variable that is set (ValueError on the first invalid one);
    returns the names set that this library does not know (likely typos)."""
    env = os.environ if environ is None else environ
    unknown = []
    for name in sorted(env):
        if not name.startswith("TOPOCOMM_"):
            continue
        if name in VARIABLES:
            get(name, env)
        else:
            unknown.append(name)
    return unknown


def parse(name: str, text: str):
    """`text` parsed as the value of `name` (ValueError naming it when invalid, an empty
    text included)."""
    var = VARIABLES[name]
    try:
        return var.parse(str(text))
    except (ValueError, TypeError, OverflowError):
        raise ValueError(f"{name}: expected {var.accepts}, got {text!r}") from None
