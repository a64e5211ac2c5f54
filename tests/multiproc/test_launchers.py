"""comms.init() under real launchers: torchrun (standalone and c10d rendezvous, where the
torchrun agent already serves the store on MASTER_PORT) and mpiexec without MASTER_ADDR
(rank 0 serves the store and broadcasts its address through mpi4py). Each script creates a
group, checks an allreduce, closes it, and does it all again in the same process."""
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)

BIN = Path(sys.executable).parent
LAUNCH_TIMEOUT_S = 150

SCRIPT = textwrap.dedent("""
    import os, sys
    import numpy as np
    import comms
    expect_store = sys.argv[1]
    for round_ in range(2):
        c = comms.init(timeout=60)
        x = np.arange(6, dtype=np.float64) + c.rank
        c.allreduce(x)
        want = c.size * np.arange(6) + sum(range(c.size))
        assert np.array_equal(x, want), (x, want)
        store = c._own_store
        kind = type(store).__name__
        host = getattr(store, "host", "-")
        assert kind == expect_store, (kind, expect_store)
        c.close()
        print(f"ok round={round_} rank={c.rank} size={c.size} store={kind} host={host} end",
              flush=True)
""")


def clean_env(**extra):
    """This environment without any launcher's variables (the test may itself run under
    one), plus `extra`."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
            "MASTER_PORT", "GROUP_RANK", "PMI_", "OMPI_", "PMIX_", "SLURM_", "TORCHELASTIC_",
            "HYDRA_", "MPI_LOCALNRANKS", "MPI_LOCALRANKID")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(extra)
    return env


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv, tmp_path, env=None):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    try:
        res = subprocess.run([str(a) if a != "SCRIPT" else str(script) for a in argv],
                             env=env or clean_env(), capture_output=True, text=True,
                             timeout=LAUNCH_TIMEOUT_S, cwd=tmp_path)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{argv[0]} hung for {LAUNCH_TIMEOUT_S}s\nstdout:\n{exc.stdout}\n"
                    f"stderr:\n{exc.stderr}")
    assert res.returncode == 0, f"exit {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    # (found in the text, not by line: two ranks' lines may interleave in one pipe)
    lines = sorted(re.findall(r"ok round=\d+ rank=\d+ size=\d+ store=\w+ host=\S+? end",
                              res.stdout))
    assert len(lines) == 4, res.stdout + res.stderr
    return lines


def need(tool, module):
    if not (BIN / tool).exists():
        pytest.skip(f"{tool} is not installed next to {sys.executable}")
    pytest.importorskip(module)


def test_torchrun_standalone(tmp_path):
    need("torchrun", "torch.distributed")
    lines = launch([BIN / "torchrun", "--standalone", "--nproc_per_node", "2", "SCRIPT",
                    "PrefixStore"], tmp_path)
    assert all("store=PrefixStore" in line for line in lines)


def test_torchrun_c10d_rendezvous(tmp_path):
    need("torchrun", "torch.distributed")
    lines = launch([BIN / "torchrun", "--nnodes", "1", "--nproc_per_node", "2",
                    "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
                    "SCRIPT", "PrefixStore"], tmp_path)
    assert all("store=PrefixStore" in line for line in lines)


def test_mpiexec_one_host_serves_on_loopback(tmp_path):
    need("mpiexec", "mpi4py")
    lines = launch([BIN / "mpiexec", "-n", "2", sys.executable, "SCRIPT", "TCPStore"], tmp_path)
    assert all("host=127.0.0.1" in line for line in lines), lines


def test_mpiexec_ranks_on_two_hosts_get_a_network_address(tmp_path):
    """Two emulated hosts (TOPOCOMM_HOST_ID per rank, one machine): rank 0 serves on the
    address the topology picks for the network, not loopback (unless the machine has no
    other interface with an address)."""
    need("mpiexec", "mpi4py")
    from comms.bootstrap.netaddr import rendezvous_host
    from topology.detect.net import probe_nics
    nics = probe_nics()
    env = clean_env()
    expected, _ = rendezvous_host(["host-a", "host-b"], {"host-a": nics, "host-b": nics},
                                  env.get("TOPOCOMM_SOCKET_IFNAME") or None)
    rank_cmd = [sys.executable, "SCRIPT", "TCPStore"]
    lines = launch([BIN / "mpiexec", "-n", "1", "-env", "TOPOCOMM_HOST_ID", "host-a", *rank_cmd,
                    ":", "-n", "1", "-env", "TOPOCOMM_HOST_ID", "host-b", *rank_cmd],
                   tmp_path, env)
    assert all(f"host={expected} end" in line for line in lines), (expected, lines)
