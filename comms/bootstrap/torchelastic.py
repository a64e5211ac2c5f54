"""The rendezvous under torchrun (torch.distributed.elastic): its agent already serves a
store at MASTER_ADDR:MASTER_PORT and says so with TORCHELASTIC_USE_AGENT_STORE=True, so
every rank connects to it as a client instead of serving another on the same port."""
from __future__ import annotations

import datetime
import os

NAMESPACE = "topocomm"


def uses_agent_store() -> bool:
    """Whether torchrun's agent serves the store (TORCHELASTIC_USE_AGENT_STORE=True)."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def agent_store(timeout: float):
    """A client of torchrun's agent store at MASTER_ADDR:MASTER_PORT (a torch.distributed
    Store), its keys under "topocomm/attempt_<TORCHELASTIC_RESTART_COUNT>/": apart from
    torch's own keys and from those of an earlier attempt of a restarted job.
    `timeout`: seconds for connecting and for each get. Raises RuntimeError when torch or
    MASTER_ADDR/MASTER_PORT is missing."""
    host = os.environ.get("MASTER_ADDR")
    port = os.environ.get("MASTER_PORT")
    if not host or not port:
        raise RuntimeError("comms.init(): TORCHELASTIC_USE_AGENT_STORE=True but MASTER_ADDR "
                           "and MASTER_PORT are not both set")
    try:
        import torch.distributed as dist
    except ImportError as exc:
        raise RuntimeError("comms.init(): TORCHELASTIC_USE_AGENT_STORE=True (a torchrun launch) "
                           "but torch.distributed cannot be imported") from exc
    world = int(os.environ.get("WORLD_SIZE") or 1)
    store = dist.TCPStore(host, int(port), world, is_master=False,
                          timeout=datetime.timedelta(seconds=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT") or "0"
    return dist.PrefixStore(f"{NAMESPACE}/attempt_{attempt}", store)
