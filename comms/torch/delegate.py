"""Devices a topocomm group hands to another backend: `init_process_group("cpu:topocomm,
cuda:nccl")`.

torch uses the Python ProcessGroup a backend's creator returns for EVERY device of the group,
so with "cpu:topocomm,cuda:nccl" the CUDA tensors come to topocomm too and NCCL is never made.
A group therefore reads its own backend config (dist.get_backend_config) on first use; for a
device type that config gives to another backend, it makes that backend itself on the first
call with such a tensor (over the group's store, under its own prefix: every rank makes it at
the same call, since ranks issue collectives in the same order) and forwards the call to it
with the same arguments, under the name that backend knows (`INNER`). Its Work is returned
as it is. Devices the config gives to topocomm, or does not name, stay here.

Backends it can make: gloo and nccl (torch's classes), and any registered plugin
(dist.Backend.register_backend), with the arguments torch would give its creator.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from comms.torch.constants import BACKEND_NAME

# our method name -> the name of the same call on a c10d backend
INNER = {
    "allreduce": "allreduce", "allreduce_coalesced": "allreduce_coalesced",
    "broadcast": "broadcast", "reduce": "reduce", "allgather": "allgather",
    "allgather_coalesced": "allgather_coalesced", "all_gather_single": "_allgather_base",
    "all_gather_single_coalesced": "allgather_into_tensor_coalesced",
    "reduce_scatter": "reduce_scatter", "reduce_scatter_single": "_reduce_scatter_base",
    "reduce_scatter_single_coalesced": "reduce_scatter_tensor_coalesced",
    "all_to_all_single": "alltoall_base", "alltoall": "alltoall", "gather": "gather",
    "scatter": "scatter", "send": "send", "recv": "recv", "recv_anysource": "recv_anysource",
}
_UNKNOWN = object()


def first_tensor(args):
    """The first tensor in args (tensors, lists of them, lists of lists), else None."""
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
        if isinstance(a, (list, tuple)):
            t = first_tensor(a)
            if t is not None:
                return t
    return None


class Delegates:
    """The backends a group forwards other devices' tensors to, made on first use."""

    def __init__(self, pg, store, rank, size, timeout, backend_opts=None):
        self.pg, self.store, self.rank, self.size = pg, store, rank, size
        self.timeout, self.backend_opts = timeout, backend_opts
        self.names = None            # device type -> backend name, read on first use
        self.made: dict = {}         # device type -> backend object

    def backend_for(self, device_type: str):
        """The backend serving device_type's tensors instead of topocomm, or None."""
        made = self.made.get(device_type, _UNKNOWN)
        if made is not _UNKNOWN:
            return made
        if self.names is None:
            self.names = _device_map(self.pg)
        name = self.names.get(device_type)
        made = None if name in (None, BACKEND_NAME) else self._make(name, device_type)
        self.made[device_type] = made
        return made

    def _make(self, name: str, device_type: str):
        store = dist.PrefixStore(f"topocomm-delegate/{device_type}/{name}/", self.store)
        if name == "gloo":
            return dist.ProcessGroupGloo(store, self.rank, self.size, self.timeout)
        if name == "nccl":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = self.timeout
            return dist.ProcessGroupNCCL(store, self.rank, self.size, opts)
        plugin = dist.Backend._plugins.get(name.upper())
        if plugin is None:
            raise ValueError(f"topocomm: the group's backend config names {name!r} for "
                             f"{device_type} tensors, which is neither gloo, nccl nor a "
                             "registered backend")
        if plugin.extended_api:
            from torch.distributed.distributed_c10d import _DistributedBackendOptions
            opts = _DistributedBackendOptions()
            opts.store, opts.group_rank, opts.group_size = store, self.rank, self.size
            opts.timeout = self.timeout
            if self.backend_opts is not None:
                opts.group_id = self.backend_opts.group_id
                opts.global_ranks_in_group = self.backend_opts.global_ranks_in_group
            return plugin.creator_fn(opts, None)
        return plugin.creator_fn(store, self.rank, self.size, self.timeout)

    def close(self):
        for backend in self.made.values():
            stop = getattr(backend, "shutdown", None) or getattr(backend, "abort", None)
            if stop is not None:
                try:
                    stop()
                except Exception:  # noqa: BLE001 - already stopped, or torch refuses twice
                    pass
        self.made.clear()


def _device_map(pg) -> dict:
    """{device type: backend name} from the group's config ("cpu:topocomm,cuda:nccl"); {}
    when torch has none for it (a group made outside init_process_group / new_group)."""
    try:
        config = dist.get_backend_config(pg)
    except Exception:  # noqa: BLE001 - not registered with torch's world (tests, stubs)
        return {}
    out = {}
    for part in str(config).split(","):
        device, sep, name = part.strip().partition(":")
        if sep:
            out[device.strip()] = name.strip().lower()
    return out


def delegating(method):
    """Method decorator: a call whose first tensor is not on the CPU goes to the backend the
    group's config names for that device, when there is one (see the module docstring)."""
    inner = INNER[method.__name__]

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        backend = self._delegated(args)
        if backend is not None:
            return getattr(backend, inner)(*args, **kwargs)
        return method(self, *args, **kwargs)
    return run
