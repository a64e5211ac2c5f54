"""A collective that a peer abandoned never completes as a success on a late rank."""
import threading

import numpy as np
import pytest

from comms.core.errors import CommError, CommTimeoutError, PeerAbortedError
from comms.testing import ThreadWorld


@pytest.mark.parametrize("count", [2, 100_000])     # the one-call small path, and the ring
def test_late_rank_raises_naming_the_collective_its_peer_gave_up_on(count):
    gave_up = threading.Event()
    with ThreadWorld(2, timeout=1.0) as w:
        def body(c):
            x = np.ones(count, np.float32)
            if c.rank == 0:
                c.allreduce(x)                   # a first one, so the fast path is warm
            else:
                c.allreduce(x)
            if c.rank == 0:
                try:
                    c.allreduce(x)               # rank 1 is late: this times out
                except CommTimeoutError as exc:
                    gave_up.set()
                    return "timeout", str(exc)
                return "ok", ""
            assert gave_up.wait(30)
            try:
                c.allreduce(x)                   # arrives after rank 0 gave up
            except PeerAbortedError as exc:
                with pytest.raises(CommError, match="broken"):
                    c.allreduce(x)               # and the group is broken from then on
                return "aborted", str(exc)
            return "ok", x[:2].tolist()
        res = w.run(body)
    assert res[0][0] == "timeout" and "rank 1" in res[0][1], res
    assert res[1][0] == "aborted", res                     # was: "ok" with rank 1's own data
    assert "rank 0 aborted during allreduce (op 2)" in res[1][1], res


def test_a_plain_close_does_not_abort_the_peers():
    """close() outside any operation leaves the abort flag alone: a peer still finishing
    its last collective is not told this rank failed."""
    with ThreadWorld(2, timeout=5.0) as w:
        c = w.comms[0]
        w.run(lambda comm: comm.allreduce(np.ones(2, np.float32)))
        c.close()
        assert c.group.ctx.broken is None        # abort() would have said why
