"""A rank that gives up creating a group because a peer died, then exits: the other
ranks that find its process gone name the death it saw, not its exit (the order in
which the ranks notice is a race on a loaded machine)."""
import subprocess
import sys

import pytest

from comms import CommError, Communicator
from comms.core.errors import PeerDeadError
from comms.core.store import HashStore
from topology.host import host_id

pytestmark = pytest.mark.timeout(60)

PREFIX = "topocomm/world/3x1"     # the first group of 3 named "world" on a fresh store


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait(timeout=30)
    return p.pid


def _create_rank_0(store):
    with pytest.raises(PeerDeadError) as info:
        Communicator(0, 3, store, timeout=20, transport="shm")
    return info.value


def _says_who(store, rank, pid):
    store.set(f"{PREFIX}/pid/{rank}", f"{host_id()}|{pid}".encode())


def test_exited_peer_that_gave_up_names_the_death_it_saw():
    store = HashStore(20)
    store.add("topocomm/world/joined/3", 2)          # ranks 1 and 2 joined before
    _says_who(store, 1, _dead_pid())
    _says_who(store, 2, _dead_pid())
    store.set(f"{PREFIX}/cause/1",
              b"2\nrank 2 (pid 7) died while group 'world' was being created")
    store.set(f"{PREFIX}/cause/2",
              b"2\nrank 2 (pid 7) died while group 'world' was being created")
    exc = _create_rank_0(store)
    assert "rank 2" in str(exc) and "seen by rank" in str(exc), exc
    assert exc.dead_ranks == (2,)


def test_a_death_without_a_cause_is_named_before_an_exit_with_one():
    store = HashStore(20)
    store.add("topocomm/world/joined/3", 2)
    _says_who(store, 1, _dead_pid())
    dead = _dead_pid()
    _says_who(store, 2, dead)
    store.set(f"{PREFIX}/cause/1",
              f"2\nrank 2 (pid {dead}) died while group 'world' was being created".encode())
    exc = _create_rank_0(store)
    assert str(exc).startswith(f"rank 2 (pid {dead}) died"), exc
    assert exc.dead_ranks == (2,)
    assert isinstance(exc, CommError)
