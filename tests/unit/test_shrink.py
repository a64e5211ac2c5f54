"""Communicator.shrink on the threads transport: the survivors agree who goes on, numbered
densely in their old order; a silent rank is left out after the window, one that checks in
later raises; every caller must ask to leave out the same ranks."""
import threading

import numpy as np
import pytest

from comms import ArgumentMismatch, CommError
from comms.testing import ThreadWorld

pytestmark = pytest.mark.timeout(120)


def _sum_after(new):
    x = np.full(3, float(new.ranks_before[new.rank] + 1))
    new.allreduce(x)
    return x[0]


def test_silent_rank_is_left_out_and_a_late_one_raises():
    decided = threading.Event()

    def step(comm):
        if comm.rank == 1:               # breaks the group, then stays silent until decided
            comm.group.abort("injected")
            assert decided.wait(60)
            with pytest.raises(CommError, match="not in the new group"):
                comm.shrink(timeout=2)
            return "late"
        with pytest.raises(CommError):
            comm.allreduce(np.ones(4))
        new = comm.shrink(timeout=2)   # load may delay a survivor's check-in
        try:
            got = (new.rank, new.size, new.ranks_before, new.rank_map, _sum_after(new))
        finally:
            new.close()
        if comm.rank == 0:
            decided.set()
        return got

    with ThreadWorld(4, timeout=20) as w:
        res = w.run(step)
    mapping = {0: 0, 2: 1, 3: 2}
    assert res[1] == "late"
    assert [r[:4] for r in (res[0], res[2], res[3])] == [
        (0, 3, [0, 2, 3], mapping), (1, 3, [0, 2, 3], mapping), (2, 3, [0, 2, 3], mapping)]
    assert {r[4] for r in (res[0], res[2], res[3])} == {1.0 + 3.0 + 4.0}


def test_exclude_leaves_out_a_live_rank_without_waiting():
    def step(comm):
        if comm.rank == 2:
            return None
        new = comm.shrink(exclude=[2], timeout=60)    # rank 2 is not waited for
        try:
            return new.ranks_before, _sum_after(new)
        finally:
            new.close()

    with ThreadWorld(3, timeout=20) as w:
        res = w.run(step)
    assert res[0] == res[1] == ([0, 1], 3.0)


def test_different_exclusions_raise_on_every_caller():
    def step(comm):
        with pytest.raises(ArgumentMismatch, match="exclude"):
            comm.shrink(exclude=[2] if comm.rank == 0 else None, timeout=30)
        return "raised"

    with ThreadWorld(3, timeout=20) as w:
        assert w.run(step) == ["raised"] * 3


@pytest.mark.parametrize("exclude, match", [([0], "names this rank"), ([5], r"\[0, 2\)"),
                                            (["x"], "must be ranks")])
def test_bad_exclude_is_refused_before_anything_changes(exclude, match):
    with ThreadWorld(2, timeout=20) as w:
        def step(comm):
            if comm.rank == 0:
                with pytest.raises((TypeError, ValueError), match=match):
                    comm.shrink(exclude=exclude)
            x = np.ones(2)
            comm.allreduce(x)                     # the group is untouched
            return x[0]
        assert w.run(step) == [2.0, 2.0]


def test_a_borrowed_host_communicator_cannot_shrink():
    with ThreadWorld(2, timeout=20, hosts="AB") as w:
        def step(comm):
            with pytest.raises(ValueError, match="borrows"):
                comm.host_communicator().shrink()
            return True
        assert w.run(step) == [True, True]


def test_a_multi_host_group_shrinks_to_one_over_the_survivors_hosts():
    """Emulated hosts A A B B; rank 3 leaves: ranks 0, 1 (host A) and 2 (host B) go on as
    a multi-host group of three, its TCP mesh made anew."""
    decided = threading.Event()

    def step(comm):
        if comm.rank == 3:
            comm.group.abort("injected")
            assert decided.wait(60)
            return None
        with pytest.raises(CommError):
            comm.allreduce(np.ones(4))
        new = comm.shrink(timeout=2)
        try:
            got = (new.size, new.is_multihost, new.hosts, _sum_after(new))
        finally:
            new.close()
        decided.set()
        return got

    with ThreadWorld(4, timeout=20, hosts="AABB") as w:
        res = w.run(step)
    assert res[:3] == [(3, True, [[0, 1], [2]], 1.0 + 2.0 + 3.0)] * 3
