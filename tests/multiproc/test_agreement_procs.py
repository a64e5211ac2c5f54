"""Settings that decide algorithms, given to one process only (an MPMD launch)."""
import textwrap

import pytest

from comms.testing import run_procs

pytestmark = pytest.mark.timeout(120)

ONE_RANK_ALGO = textwrap.dedent("""
    import os, time
    import numpy as np
    if os.environ["RANK"] == "0":
        os.environ["TOPOCOMM_ALGO"] = "allreduce:ring"
    import comms
    t0 = time.monotonic()
    try:
        c = comms.init(timeout=60)
    except ValueError as exc:
        print("MISMATCH", type(exc).__name__, round(time.monotonic() - t0, 1), exc)
    else:
        x = np.ones(4, np.float32)
        c.allreduce(x)
        print("RAN", x.tolist())
        c.close()
""")


def test_algo_on_one_process_fails_every_rank_at_creation():
    """Every rank raises ArgumentMismatch naming TOPOCOMM_ALGO within seconds; none runs a
    collective (before, rank 1 returned its own input unreduced and rank 0 timed out)."""
    res = run_procs(2, ONE_RANK_ALGO, timeout=90)
    for r, (rc, so, se) in enumerate(res):
        assert rc == 0, (r, so, se)
        assert so.startswith("MISMATCH ArgumentMismatch"), (r, so, se)
        assert "TOPOCOMM_ALGO" in so and float(so.split()[2]) < 30, (r, so)
