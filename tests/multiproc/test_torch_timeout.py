"""TOPOCOMM_TIMEOUT bounds every wait under torch too (torch passes its own 30-minute
default), and the late rank then raises instead of completing the abandoned collective."""
import textwrap

import pytest

from comms.testing import run_procs

pytestmark = pytest.mark.timeout(120)

SILENT_RANK = textwrap.dedent("""
    import os, time
    import torch, torch.distributed as dist
    import comms
    dist.init_process_group("topocomm")
    r = dist.get_rank()
    t = torch.ones(4)
    dist.all_reduce(t)                       # both here: the group works
    if r == 1:
        time.sleep(8)                        # the silent rank (injected), then late
    t0 = time.monotonic()
    try:
        dist.all_reduce(t)
        print("OK", round(time.monotonic() - t0, 2), t.tolist())
    except Exception as exc:
        print("RAISED", round(time.monotonic() - t0, 2), type(exc).__name__, exc)
    os._exit(0)                              # the group is broken: skip the orderly teardown
""")


def test_topocomm_timeout_bounds_waits_under_torch_and_the_late_rank_raises():
    res = run_procs(2, SILENT_RANK, timeout=90, env={"TOPOCOMM_TIMEOUT": "5"})
    (rc0, out0, err0), (rc1, out1, err1) = res
    assert rc0 == 0 and out0.startswith("RAISED"), (out0, err0)
    assert 4 <= float(out0.split()[1]) < 6.5, out0            # within 6 s (5 s + slack)
    assert "did not respond within 5s" in out0, out0
    assert rc1 == 0 and out1.startswith("RAISED"), (out1, err1)   # not "OK" with its own data
    assert "rank 0 aborted during allreduce" in out1, out1
