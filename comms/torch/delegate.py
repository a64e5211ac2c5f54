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
import inspect

import torch
import torch.distributed as dist

from comms.torch.constants import BACKEND_NAME

# our method name -> (the same call on a c10d backend, its options class or None, where
# our method's opts argument is: its positional index after self). The coalesced
# single-tensor calls, which c10d backends do not have, are one call per pair (COALESCED).
_C = torch._C._distributed_c10d
INNER = {
    "allreduce": ("allreduce", _C.AllreduceOptions, 1),
    "allreduce_coalesced": ("allreduce_coalesced", _C.AllreduceCoalescedOptions, 1),
    "broadcast": ("broadcast", _C.BroadcastOptions, 1),
    "reduce": ("reduce", _C.ReduceOptions, 1),
    "allgather": ("allgather", _C.AllgatherOptions, 2),
    "allgather_coalesced": ("allgather_coalesced", _C.AllgatherOptions, 2),
    "all_gather_single": ("_allgather_base", _C.AllgatherOptions, 2),
    "all_gather_single_coalesced": ("_allgather_base", _C.AllgatherOptions, 2),
    "reduce_scatter": ("reduce_scatter", _C.ReduceScatterOptions, 2),
    "reduce_scatter_single": ("_reduce_scatter_base", _C.ReduceScatterOptions, 2),
    "reduce_scatter_single_coalesced": ("_reduce_scatter_base", _C.ReduceScatterOptions, 2),
    "all_to_all_single": ("alltoall_base", _C.AllToAllOptions, 4),
    "alltoall": ("alltoall", _C.AllToAllOptions, 2),
    "gather": ("gather", _C.GatherOptions, 2), "scatter": ("scatter", _C.ScatterOptions, 2),
    "send": ("send", None, None), "recv": ("recv", None, None),
    "recv_anysource": ("recv_anysource", None, None),
}
COALESCED = ("all_gather_single_coalesced", "reduce_scatter_single_coalesced")
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
        if name in ("gloo", "nccl"):
            if name == "gloo":
                backend = dist.ProcessGroupGloo(store, self.rank, self.size, self.timeout)
            else:
                opts = dist.ProcessGroupNCCL.Options()
                opts._timeout = self.timeout
                if self.backend_opts is not None:      # as torch fills them in
                    try:
                        opts.global_ranks_in_group = self.backend_opts.global_ranks_in_group
                        opts.group_name = f"{self.backend_opts.group_id}:{device_type}"
                    except AttributeError:  # an older torch's options: names only
                        pass
                backend = dist.ProcessGroupNCCL(store, self.rank, self.size, opts)
            number = getattr(backend, "_set_sequence_number_for_group", None)
            if number is not None:
                number()
            return backend
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


def forward(backend, name: str, args: tuple):
    """Our method `name`'s call (positional args as torch passes them) on `backend`, with
    default options where the caller gave none (c10d backends refuse None)."""
    inner, options, opts_at = INNER[name]
    if options is not None:
        if len(args) == opts_at:
            args = args + (None,)
        if args[-1] is None:
            args = args[:-1] + (options(),)
    if name in COALESCED:
        return _coalesced(backend, inner, *args)
    return getattr(backend, inner)(*args)


def _coalesced(backend, inner, outputs, inputs, opts):
    """One call per (output, input) pair as one Work: the backend's own coalescing where it
    has it (NCCL: one Work ordered on its stream), else each call waited for here (errors
    raise) and a completed Work returned."""
    run = getattr(backend, inner)
    if getattr(backend, "supports_coalescing", False):
        _with_device(backend._start_coalescing, outputs)
        for o, i in zip(outputs, inputs):
            run(o, i, opts)
        return _with_device(backend._end_coalescing, outputs)
    for o, i in zip(outputs, inputs):
        run(o, i, opts).wait()
    fut = torch.futures.Future()
    fut.set_result(list(outputs))
    return _C._create_work_from_future(fut)


def _with_device(method, outputs):
    """method() (torch 2.13), or method(device) where an older torch wants the device."""
    try:
        return method()
    except TypeError:
        return method(outputs[0].device)


def delegating(method):
    """Method decorator: a call whose first tensor is not on the CPU goes to the backend the
    group's config names for that device, when there is one (see the module docstring)."""
    name = method.__name__
    params = list(inspect.signature(method).parameters)[1:]

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        backend = self._delegated(args)
        if backend is not None:
            if kwargs:      # torch passes positional arguments; a direct caller may not
                args = args + tuple(kwargs[p] for p in params[len(args):] if p in kwargs)
            return forward(backend, name, args)
        return method(self, *args, **kwargs)
    return run
