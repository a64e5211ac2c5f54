"""Facade over the data-path helpers: the C extension comms.kernels._native when it is built,
else comms.kernels.reference (numpy), with the same functions and signatures.

TOPOCOMM_PURE_PYTHON=1 forces the fallback. A missing or broken extension is one log
line (at first use), never an import error.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger("topocomm")

_impl = None
is_native = False
why_not_native = ""


def _load():
    global _impl, is_native, why_not_native
    if _impl is not None:
        return _impl
    if os.environ.get("TOPOCOMM_PURE_PYTHON", "") not in ("", "0"):
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


def reset_for_tests():
    global _impl, is_native
    _impl, is_native = None, False
