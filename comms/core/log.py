"""The library's log: logger "topocomm", set up from TOPOCOMM_DEBUG / TOPOCOMM_DEBUG_FILE.

    TOPOCOMM_DEBUG=INFO    group creation (topology summary, transports; never secrets),
                           each first choice per (collective, power-of-two size bucket),
                           every error
    TOPOCOMM_DEBUG=TRACE   adds every collective: its op number, arrival and time taken
    TOPOCOMM_DEBUG_FILE    one file per process instead of stderr: %h host, %p pid
Unset, the logger is left to the application's logging configuration (warnings reach the
root handlers as usual).
"""
from __future__ import annotations

import logging
import os
import socket

from topology import env

TRACE = 5
log = logging.getLogger("topocomm")
logging.addLevelName(TRACE, "TRACE")
_configured = None      # the TOPOCOMM_DEBUG setting the handler was made for
_tracing = False


def configure() -> None:
    """Apply TOPOCOMM_DEBUG / TOPOCOMM_DEBUG_FILE once per process (again if they change)."""
    global _configured, _tracing
    level = env.get("TOPOCOMM_DEBUG")
    path = env.get("TOPOCOMM_DEBUG_FILE")
    if (level, path) == _configured:
        return
    _configured = (level, path)
    for h in [h for h in log.handlers if getattr(h, "topocomm_debug", False)]:
        log.removeHandler(h)
        h.close()
    _tracing = level == "TRACE"
    if level is None:
        log.setLevel(logging.NOTSET)
        log.propagate = True
        return
    log.setLevel(TRACE if _tracing else getattr(logging, level))
    if path:
        handler = logging.FileHandler(path.replace("%h", socket.gethostname())
                                      .replace("%p", str(os.getpid())))
    else:
        handler = logging.StreamHandler()
    handler.topocomm_debug = True
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s {socket.gethostname()}:{os.getpid()} topocomm %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.propagate = False


def tracing() -> bool:
    """Whether TOPOCOMM_DEBUG=TRACE is on (every collective is logged)."""
    return _tracing
