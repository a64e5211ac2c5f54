"""The torch.distributed seam: backend "topocomm" as a Python ProcessGroup over a Communicator.

This module registers the backend (register(), is_registered(), the creator torch calls for
each group) and gives layers above the Communicator behind a group (communicator_of) and a
way to run a call in a group's order (run_in_order). It loads without torch: register()
is then False and communicator_of() a TypeError. The seam is comms.torch:

    constants   the backend's name, devices, the inline limit
    group       ProcessGroupTopocomm (each collective under every spelling torch knows)
    work        TopocommWork (a dist.Work), the queued operation and its future
    runner      the ordered runner: inline or on the group's progress thread, in issue order
    checks      argument checks, the errors they raise, the rejection on every rank
    tensors     dense copies and write-back of non-contiguous tensors

comms.torch is the only package that touches torch's private distributed APIs (the
ProcessGroup trampoline, ``Backend._plugins``, the extended creator options). Everything else
in topocomm is framework-free.

    import comms                                   # calls register()
    dist.init_process_group("topocomm", rank=r, world_size=n, store=...)
    sub = dist.new_group([0, 1], backend="topocomm")
"""
from __future__ import annotations

import sys

from comms.torch.constants import (BACKEND_NAME, DEVICES, INLINE_MAX_BYTES,  # noqa: F401
                                    MEMORY_DEVICES)
from comms.torch.runner import run_in_order  # noqa: F401
from topology import env

try:  # torch is optional: without it register() is a no-op
    import torch
    import torch.distributed as dist

    _HAVE_DIST = bool(dist.is_available())
except ImportError:  # pragma: no cover - exercised only without torch
    torch = None
    dist = None
    _HAVE_DIST = False

__all__ = ["BACKEND_NAME", "DEVICES", "INLINE_MAX_BYTES", "register", "is_registered"]

if _HAVE_DIST:  # the modules built on torch.distributed's classes
    from comms.torch.checks import _BadType, _BadValue  # noqa: F401
    from comms.torch.group import ProcessGroupTopocomm
    from comms.torch.work import TopocommWork  # noqa: F401

    __all__ += ["ProcessGroupTopocomm", "TopocommWork"]


def is_registered() -> bool:
    return _HAVE_DIST and BACKEND_NAME.upper() in getattr(dist.Backend, "_plugins", {})


def register() -> bool:
    """Register backend "topocomm" with torch.distributed; idempotent. False without torch."""
    if not _HAVE_DIST:
        return False
    if is_registered():
        return True
    import inspect

    params = inspect.signature(dist.Backend.register_backend).parameters
    kwargs = {}
    if "devices" in params:
        kwargs["devices"] = list(DEVICES)
    if "extended_api" in params:
        kwargs["extended_api"] = True
    dist.Backend.register_backend(BACKEND_NAME, _create, **kwargs)
    return True


def _communicator_class():
    pkg = sys.modules.get("comms")  # the package attribute: tests put a stub there
    cls = getattr(pkg, "Communicator", None)
    if cls is None:
        from comms.api.communicator import Communicator as cls
    return cls


_classic_groups = iter(range(1 << 62))


def _create(*args):
    """Backend creator. Extended API: (DistributedBackendOptions, pg_options); classic API:
    (store, rank, size, timeout). The store is already prefixed with the group's name."""
    if len(args) == 2:
        opts, _pg_options = args
        store, rank, size, timeout = opts.store, opts.group_rank, opts.group_size, opts.timeout
        name = str(opts.group_id)
    else:
        store, rank, size, timeout = args
        opts = None
        name = f"classic{next(_classic_groups)}"
    timeout_s = timeout.total_seconds() if hasattr(timeout, "total_seconds") else float(timeout)
    # TOPOCOMM_TIMEOUT, when set, bounds every wait of this group whatever torch passes
    # (init_process_group's timeout, 30 min by default)
    own = env.get("TOPOCOMM_TIMEOUT")
    if own is not None:
        timeout_s = own
    comm = _communicator_class()(rank, size, store, timeout=timeout_s, name=name)
    return ProcessGroupTopocomm(comm, rank, size, name=name, timeout_s=timeout_s,
                                delegate_args=(store, rank, size, timeout, opts))


def communicator_of(group=None):
    """(Communicator, ProcessGroupTopocomm) behind a torch process group created with backend
    "topocomm" (None: the default group). TypeError for other backends, ValueError when no
    default group exists. Layers above (comms.moe) reach the Communicator through here, so
    comms.torch stays the only package touching private torch APIs."""
    from comms.api.communicator import Communicator
    if not _HAVE_DIST:
        raise TypeError("group: expected a comms.Communicator (torch.distributed is not available)")
    if group is None:
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("group: None means the default torch.distributed group, but none is "
                             "initialized; pass a comms.Communicator or a process group")
        group = dist.group.WORLD
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group: expected a comms.Communicator or a torch ProcessGroup, got "
                        f"{type(group).__name__}")
    pg = group  # with the extended backend API torch hands out our group itself
    if not isinstance(getattr(pg, "communicator", None), Communicator):
        try:  # older torch wraps backends in a ProcessGroup
            pg = group._get_backend(torch.device("cpu"))
        except Exception:
            pg = group
    comm = getattr(pg, "communicator", None)
    if not isinstance(comm, Communicator):
        name = getattr(pg, "getBackendName", lambda: type(pg).__name__)()
        raise TypeError(f"group: backend {name!r} is not topocomm")
    return comm, pg


def shrink(group=None, exclude=None, timeout=None):
    """A topocomm process group of the ranks of `group` (None: the default group) that go
    on after a dead or aborted peer (Communicator.shrink: how they agree, what `exclude`
    and `timeout` mean). Every survivor calls it after its collective raised.

    The old group is destroyed. Shrinking the default group makes the new group the
    default, numbered densely (dist.get_rank() and get_world_size() answer for it), and
    destroys every other group, as torch's own shrink_group does: their ranks named the
    old world. A shrunk sub-group keeps the global ranks of its survivors."""
    from torch.distributed import distributed_c10d as c10d
    comm, pg = communicator_of(group)
    is_default = group is None or pg is c10d._get_default_group()
    backend_name, store = c10d._world.pg_map[pg]
    config = c10d._world.pg_backend_config.get(pg, BACKEND_NAME)
    global_ranks = dist.get_process_group_ranks(pg)
    new = comm.shrink(exclude=exclude, timeout=timeout)    # closes the old Communicator
    dist.destroy_process_group(None if is_default else pg)
    if is_default:
        name = _next_group_name(c10d, new.size)
        mapping = {q: q for q in range(new.size)}
    else:
        name = f"{pg.group_name}.shrunk"
        mapping = {global_ranks[old]: q for q, old in enumerate(new.ranks_before)}
    new_pg = ProcessGroupTopocomm(new, new.rank, new.size, name=name,
                                  timeout_s=pg._timeout_s)
    if is_default:
        c10d._update_default_pg(new_pg)
    _register_in_world(c10d, new_pg, backend_name, store, name, config, mapping)
    return new_pg


def _next_group_name(c10d, size):
    """The name torch gives the next group it makes (the default group after a shrink)."""
    try:
        return c10d._process_group_name(list(range(size)), use_hashed_name=False)
    except (AttributeError, TypeError):
        return "shrunk"


def _register_in_world(c10d, pg, backend_name, store, name, config, mapping):
    """Record a group in torch.distributed's tables, as its own group constructors do."""
    if hasattr(c10d, "_register_pg_in_world"):
        c10d._register_pg_in_world(pg, backend_name, store, name, config, mapping)
        return
    world = c10d._world
    world.pg_map[pg] = (backend_name, store)
    world.pg_names[pg] = name
    world.pg_backend_config[pg] = config
    world.pg_group_ranks[pg] = mapping
    world.tags_to_pg.setdefault(f"ptd:{name}", []).append(pg)
    world.pg_to_tag[pg] = f"ptd:{name}"
    register_name = getattr(c10d, "_register_process_group", None)
    if register_name is not None:
        register_name(name, pg)
