"""bench/alltoall_algos.py under mpiexec: every algorithm and MPICH run, rows print, no value
is wrong (skips where mpi4py or the venv's mpiexec is missing)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run_algos(*args, **env):
    """bench/alltoall_algos.py under the venv's mpiexec, 2 ranks, nothing forced."""
    pytest.importorskip("mpi4py")
    mpiexec = Path(sys.executable).parent / "mpiexec"
    if not mpiexec.exists():
        pytest.skip("no mpiexec next to this python")
    env = dict(os.environ, PYTHONPATH=str(REPO), **env)
    env.pop("TOPOCOMM_ALGO", None)
    return subprocess.run([str(mpiexec), "-n", "2", sys.executable,
                           str(REPO / "bench" / "alltoall_algos.py"), *args],
                          capture_output=True, text=True, timeout=120, env=env, cwd=str(REPO))


def test_alltoall_algos_runs_every_algorithm_and_checks_values():
    proc = _run_algos("-b", "64K", "-e", "256K", "-t", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"pairwise\s+direct\s+staged\s+chosen\s+mpi", proc.stdout), proc.stdout
    rows = [ln for ln in proc.stdout.splitlines() if re.match(r"\s+\d+\s", ln)]
    assert [int(r.split()[0]) for r in rows] == [65536, 262144], proc.stdout
    assert all(len(r.split()) == 11 for r in rows), rows     # size + 5 x "median (min)"
    assert "#wrong" not in proc.stdout


def test_alltoall_algos_without_direct_reads_leaves_direct_out():
    """TOPOCOMM_CMA=0: no direct column; "chosen" measures cached against streamed pairwise
    writes at 1 MiB and every value is still checked."""
    proc = _run_algos("-b", "1M", "-e", "1M", "-t", "3", TOPOCOMM_CMA="0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"size\s+pairwise\s+staged\s+chosen\s+mpi", proc.stdout), proc.stdout
    assert "#wrong" not in proc.stdout


def test_soak_short_round_checks_every_result_and_leaves_nothing():
    """bench/soak.py for one short round: faults injected, 0 wrong, 0 unexpected, 0 leaks."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "soak.py"), "--minutes", "0.1",
                           "--round", "8"], capture_output=True, text=True, timeout=200,
                          env=env, cwd=str(REPO))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    total = [ln for ln in proc.stdout.splitlines() if ln.startswith("# total:")]
    assert total and "unexpected errors and leaks: 0" in total[0], proc.stdout
    assert "'wrong': 0" in total[0] and "'ops': 0" not in total[0], total
