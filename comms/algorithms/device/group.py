"""The group comms/plan/select.py MEMORY_GROUPS names for CUDA memory: it runs each
collective on device buffers by CUDA IPC where that applies (comms/algorithms/device/ipc.py:
one host, the data never leaves device memory) and staged through pinned host memory
otherwise (comms/algorithms/device/staged.py: across hosts, send / recv, an allocation that
cannot be mapped, TOPOCOMM_CUDA_PATH=staged). Every rank of a call takes the same path: the
IPC path's exchange decides it from every rank's record."""
from __future__ import annotations

from topology import env
from comms.algorithms.device.ipc import IpcGroup
from comms.algorithms.device.staged import StagedGroup
from comms.kernels import cuda
from comms.transport import cuda_ipc


class DeviceGroup:
    HOW = ("CUDA IPC on one host (each input read once and each output written once by "
           "kernels on the ranks' own buffers, queued on the caller's stream: "
           "comms/algorithms/device/ipc.py); across hosts, and where a rank cannot map its "
           "buffers, " + StagedGroup.HOW)
    COLLECTIVES = StagedGroup.COLLECTIVES

    def __init__(self, host, store, prefix, timeout):
        # no communication here: a rank may make this group alone (check_memory's rule)
        self.staged = StagedGroup(host, store, prefix, timeout)
        self.ipc = None
        if env.get("TOPOCOMM_CUDA_PATH") == "auto" and IpcGroup.applies(host):
            ipc, kernels = cuda_ipc.ipc(), cuda.kernels()
            self.ipc = IpcGroup(host, ipc, kernels,
                                why_not=cuda_ipc.unavailable() or cuda.unavailable())

    @staticmethod
    def unavailable() -> str:
        """Why device buffers cannot be moved in this process ("" when they can)."""
        return StagedGroup.unavailable()

    def path(self) -> str:
        """How the next call runs: "ipc" or "staged" (for explain and tests)."""
        return "ipc" if self.ipc is not None and not self.ipc.off else "staged"

    # ---- collectives (the host group's signatures) ---------------------------------------
    def _either(self, name, result, *args):
        """IpcGroup's `name` where it runs the call (every rank alike), else StagedGroup's."""
        if self.ipc is not None and getattr(self.ipc, name)(*args):
            return result
        return getattr(self.staged, name)(*args)

    def allreduce(self, sb, rb, opc, op=None):
        return self._either("allreduce", rb.obj, sb, rb, opc, op)

    def reduce(self, sb, rb, opc, root):
        return self._either("reduce", rb.obj, sb, rb, opc, root)

    def reduce_scatter(self, sb, rb, opc, op=None):
        return self._either("reduce_scatter", rb.obj, sb, rb, opc, op)

    def broadcast(self, b, root):
        return self._either("broadcast", b.obj, b, root)

    def allgather(self, sb, rb):
        return self._either("allgather", rb.obj, sb, rb)

    def gather(self, root, sb, rb):
        return self._either("gather", rb.obj if rb is not None else None, root, sb, rb)

    def scatter(self, root, sb, rb):
        return self._either("scatter", rb.obj, root, sb, rb)

    def all_to_all(self, sb, rb, sc, rc, even):
        return self._either("all_to_all", rb.obj, sb, rb, sc, rc, even)

    def send(self, b, dst, tag):
        self.staged.send(b, dst, tag)

    def recv(self, b, src, tag):
        return self.staged.recv(b, src, tag)

    def close(self, during_operation=False):
        if self.ipc is not None:
            self.ipc.close()
        self.staged.close(during_operation)
