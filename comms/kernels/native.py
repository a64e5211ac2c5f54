"""Facade over the data-path helpers: the C extension comms.kernels._native when it is built,
else comms.kernels.reference (numpy), with the same functions and signatures.

TOPOCOMM_PURE_PYTHON=1 forces the fallback. A missing or broken extension is one log
line (at first use), never an import error.
"""
from __future__ import annotations

import logging

from topology import env

log = logging.getLogger("topocomm")

_impl = None
is_native = False
why_not_native = ""


def _load():
    global _impl, is_native, why_not_native
    if _impl is not None:
        return _impl
    if env.get("TOPOCOMM_PURE_PYTHON"):
        why_not_native = "TOPOCOMM_PURE_PYTHON is set"
    else:
        try:
            from comms.kernels import _native  # type: ignore[attr-defined]
            _impl, is_native = _native, True
            return _impl
        except ImportError as exc:
            why_not_native = f"C helpers not available ({exc})"
            log.warning("topocomm: %s; using the numpy fallback (slower, same results)",
                        why_not_native)
    from comms.kernels import reference as fallback
    _impl = fallback
    return _impl


def impl():
    """The module implementing the data path (comms.kernels._native or comms.kernels.reference)."""
    return _impl if _impl is not None else _load()


def _addr_numpy(arr) -> int:
    return arr.__array_interface__["data"][0]


def addr(arr) -> int:
    """Address of the first byte of a contiguous numpy array: the C helpers' addr_of (the
    buffer protocol, about 10x cheaper than arr.ctypes.data) when they are loaded, else the
    array interface. Call it as native.addr(a): the first call replaces this module's `addr`
    with the function it chose, so later calls go straight to it."""
    global addr
    impl()
    addr = _impl.addr_of if is_native else _addr_numpy
    return addr(arr)
