"""Which ranks of a broken group go on: the survivors' agreement behind
Communicator.shrink() (as MPI_Comm_shrink and ncclCommShrink do for their groups).

Every rank that calls shrink checks in on the store under the old group's namespace,
saying which peers it knows to be dead (a peer on its machine whose process is gone: the
pid every rank published when the group was made) and which ranks it was asked to leave
out. The first rank to check in decides (an atomic add on the store elects it): it waits
until every other rank has checked in or is known dead, at most `window` seconds, then
writes the survivors. A rank that checks in after that decision is not in the new group
and raises. Dead is only ever "its process is gone": a rank on another machine that stays
silent is waited for up to the window and then left out.

The store must outlive the dead rank: it does under torchrun (the agent serves it) and when
the rank serving it (rank 0 of comms.init) is a survivor.
"""
from __future__ import annotations

import os
import time

from comms.core.errors import ArgumentMismatch, CommError, CommTimeoutError
from comms.core.store import has_key
from comms.kernels.reference import pid_alive

POLL_S = 0.002          # between looks at the store (a sleep: the waiting rank yields)
POLL_MAX_S = 0.02


def dead_on_this_machine(store, prefix, size, machine) -> set:
    """Ranks of the group made under `prefix` that ran on this machine and whose process
    is gone (the "machine|pid" each rank published at creation)."""
    dead = set()
    for q in range(size):
        key = f"{prefix}/pid/{q}"
        if not has_key(store, key):
            continue
        where, _, pid = bytes(store.get(key)).decode(errors="replace").rpartition("|")
        if where == machine and pid.isdigit() and int(pid) != os.getpid() \
                and not pid_alive(int(pid)):
            dead.add(q)
    return dead


def _ranks(text: str) -> set:
    return {int(x) for x in text.split(",") if x}


def _text(ranks) -> str:
    return ",".join(str(q) for q in sorted(ranks))


def agree(store, prefix, rank, size, machine, *, exclude=None,
          window: float, timeout: float) -> list:
    """The survivors (old ranks, ascending) every rank that checked in in time receives.

    exclude: ranks the caller wants
    left out (every survivor must pass the same; None: only the dead and the silent).
    window: how long the deciding rank waits for a rank that is neither checked in nor
    known dead. timeout: how long the others wait for the decision beyond the window.
    """
    pre = f"{prefix}/shrink"
    dead = dead_on_this_machine(store, prefix, size, machine)
    asked = None if exclude is None else _text(exclude)
    store.set(f"{pre}/in/{rank}",
              f"{_text(dead)}|{'auto' if asked is None else asked}".encode())
    if int(store.add(f"{pre}/leader", 1)) == 1:
        store.set(f"{pre}/decision", _decide(store, pre, rank, size, dead, asked, prefix,
                                             machine, window).encode())
    deadline = time.monotonic() + window + timeout
    delay = POLL_S
    while not has_key(store, f"{pre}/decision"):
        if time.monotonic() > deadline:
            raise CommTimeoutError(
                f"shrink: no decision on the survivors within {window + timeout:g}s (the "
                "rank deciding it died or lost the store)")
        time.sleep(delay)
        delay = min(delay * 2, POLL_MAX_S)
    decision = bytes(store.get(f"{pre}/decision")).decode(errors="replace")
    kind, _, body = decision.partition(":")
    if kind == "mismatch":
        raise ArgumentMismatch(f"exclude: {body}")
    if kind != "ok":
        raise CommError(f"shrink: {body}")
    survivors = sorted(_ranks(body))
    if rank not in survivors:
        raise CommError(f"shrink: rank {rank} checked in after the survivors "
                        f"{survivors} were decided (it was silent for {window:g}s): "
                        "it is not in the new group")
    return survivors


def _decide(store, pre, me, size, dead, asked, prefix, machine, window) -> str:
    """The deciding rank: wait until every rank checked in or is known dead (at most
    `window` s), then "ok:<survivors>", or "mismatch:<why>" when the ranks asked for
    different exclusions."""
    came = {me: asked}
    deadline = time.monotonic() + window
    delay = POLL_S
    next_pid_look = 0.0
    while True:
        for q in range(size):
            if q in came or q in dead:
                continue
            key = f"{pre}/in/{q}"
            if has_key(store, key):
                seen, _, theirs = bytes(store.get(key)).decode(errors="replace").partition("|")
                came[q] = None if theirs == "auto" else theirs
                dead |= _ranks(seen)
        for q in came:
            dead.discard(q)          # it checked in: whatever another rank thought, it lives
        left = [q for q in range(size) if q not in came and q not in dead]
        if asked is not None:        # ranks the callers leave out are not waited for
            left = [q for q in left if q not in _ranks(asked)]
        if not left or time.monotonic() > deadline:
            break
        now = time.monotonic()
        if now >= next_pid_look:
            dead |= dead_on_this_machine(store, prefix, size, machine)
            next_pid_look = now + 0.05
        time.sleep(delay)
        delay = min(delay * 2, POLL_MAX_S)
    wishes = set(came.values())
    if len(wishes) > 1:
        said = "; ".join(f"rank {q}: {'none' if v is None else '[' + v + ']'}"
                         for q, v in sorted(came.items()))
        return f"mismatch:the ranks calling shrink asked to leave out different ranks ({said})"
    survivors = set(came)
    if asked is not None:
        survivors -= _ranks(asked)
    if not survivors:
        return "error:every rank that checked in asked to be left out"
    return "ok:" + _text(survivors)
