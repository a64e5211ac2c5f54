"""A rank that dies while the group is being created: its peers on the machine raise
PeerDeadError within seconds, not at the store's timeout."""
import textwrap

import pytest

from comms.testing import run_procs

pytestmark = pytest.mark.timeout(120)

DIES_DURING_CREATION = textwrap.dedent("""
    import os, signal, time
    import comms
    from comms.api import host
    if os.environ["RANK"] == "2":
        real = host.HostGroup.__init__
        def die(self, *a, **k):
            os.kill(os.getpid(), signal.SIGKILL)    # after saying who it is, before its segment
        host.HostGroup.__init__ = die
    t0 = time.monotonic()
    try:
        c = comms.init(timeout=60)
    except comms.CommError as exc:
        print("RAISED", type(exc).__name__, round(time.monotonic() - t0, 2), exc)
    else:
        print("CREATED")
        c.close()
""")


DIES_ON_ANOTHER_HOST = ("import os\nos.environ['TOPOCOMM_HOST_ID'] = 'emulated-' + "
                        "os.environ['RANK']\n") + DIES_DURING_CREATION.replace(
    "from comms.api import host\n", "from comms.api import host, multihost\n").replace(
    "host.HostGroup.__init__ = die", "multihost.MultiHostGroup.__init__ = die")


@pytest.mark.parametrize("code", [DIES_DURING_CREATION, DIES_ON_ANOTHER_HOST],
                         ids=["same machine", "another host"])
def test_sigkilled_during_creation_peers_raise_within_5_s(code):
    """On the same machine the peers see the dead rank's pid; each rank on its own
    (emulated) host has no pid to watch, so the peers see its heartbeat on the store stop."""
    res = run_procs(3, code, timeout=90)
    assert res[2][0] == -9, res[2]
    for r in (0, 1):
        rc, so, se = res[r]
        assert rc == 0 and so.startswith("RAISED PeerDeadError"), (r, so, se)
        assert "rank 2" in so and float(so.split()[2]) < 5, (r, so)
