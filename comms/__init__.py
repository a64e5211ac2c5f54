"""topocomm: topology-aware collectives for torch.distributed and MPI-launched numpy code.

    import comms                       # registers the torch backend "topocomm" (if torch is installed)
    comm = comms.init()                # rank/size/rendezvous from torchrun, mpiexec or Slurm env
    comm.allreduce(x)                  # numpy arrays or torch CPU tensors, in place
"""
from .communicator import Communicator  # noqa: F401
from .errors import CommError, CommTimeoutError, PeerAbortedError, PeerDeadError  # noqa: F401

__version__ = "0.1.0"


def init(**kwargs):
    """A Communicator for this process, from the launcher's environment (see bootstrap)."""
    from .bootstrap import init as _init
    return _init(**kwargs)


def register():
    """Register the torch backend "topocomm" (done at import; idempotent)."""
    try:
        from .backend import register as _register
    except ImportError:
        return False
    return _register()


register()
