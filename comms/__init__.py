"""topocomm: topology-aware collectives for torch.distributed and MPI-launched numpy code.

    import comms                       # registers the torch backend "topocomm" (if torch is installed)
    comm = comms.init()                # rank/size/rendezvous from torchrun, mpiexec or Slurm env
    comm.allreduce(x)                  # numpy arrays or torch CPU tensors, in place

The torch backend is registered when torch is already imported, or else when torch is
imported later (through torch's "torch.backends" entry-point autoload, see pyproject), so
numpy-only programs never pay for importing torch.
"""
import sys

from comms.api.communicator import Communicator  # noqa: F401
from comms.core.errors import (ArgumentMismatch, CommError, CommTimeoutError,  # noqa: F401
                               MessageMismatch, NoAlgorithm, PeerAbortedError, PeerDeadError)

__version__ = "0.1.0"


def init(**kwargs):
    """A Communicator for this process, from the launcher's environment (see bootstrap)."""
    from comms.bootstrap import init as _init
    return _init(**kwargs)


def stats(group=None) -> dict:
    """Communicator.stats() of a torch group with backend "topocomm" (None: the default
    group) or of a Communicator."""
    if isinstance(group, Communicator):
        return group.stats()
    from comms.torch.backend import communicator_of
    return communicator_of(group)[0].stats()


def shrink(group=None, exclude=None, timeout=None):
    """After a peer died or aborted: the survivors' new group. A Communicator gives a new
    Communicator (Communicator.shrink); a torch group with backend "topocomm" (None: the
    default group) gives a new torch group, registered with torch.distributed
    (comms/torch/backend.py shrink)."""
    if isinstance(group, Communicator):
        return group.shrink(exclude=exclude, timeout=timeout)
    from comms.torch.backend import shrink as _shrink
    return _shrink(group, exclude=exclude, timeout=timeout)


def register():
    """Register the torch backend "topocomm" (idempotent); False when torch is missing."""
    try:
        from comms.torch.backend import register as _register
    except ImportError:
        return False
    return _register()


def _torch_autoload():
    """Called by torch at the end of `import torch` (entry point group torch.backends).
    Must never raise: that would break `import torch` for everyone."""
    try:
        register()
    except Exception as exc:  # pragma: no cover - reported, never fatal
        import logging
        logging.getLogger("topocomm").warning("topocomm: torch backend not registered: %s", exc)


if "torch" in sys.modules:
    _torch_autoload()
