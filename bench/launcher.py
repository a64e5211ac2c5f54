"""Starting the ranks. `--np N` spawns N local ranks as subprocesses with a torchrun-style
environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT, ...) or, when MPI is among the backends,
one `mpiexec -n N`; the backends of one comparison share the same ranks (trials interleaved)
unless --separate. Each rank's command line comes from child_args; rank 0 leaves its results
in a JSON file the launcher reads back. A launch that fails, times out or cannot start (no
mpi4py or mpiexec) comes back as a status (FAILED / TIMEOUT / MISSING) with its reason, and
ranks still running when this process exits are killed. Also: whether this process is a rank
of an external launcher (torchrun, mpiexec, Slurm)."""
from __future__ import annotations

import atexit
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from harness import CollSpec

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent


_LAUNCH_ENVS = (("RANK", "WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE"),
                ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS"))


def world_from_env(env=None, required: bool = True):
    """(rank, size) from torchrun, mpiexec (MPICH / Open MPI) or Slurm variables."""
    env = os.environ if env is None else env
    for rank_key, size_key in _LAUNCH_ENVS:
        if rank_key in env and size_key in env:
            return int(env[rank_key]), int(env[size_key])
    if required:
        raise RuntimeError("no rank/size in the environment (RANK/WORLD_SIZE, PMI_*, OMPI_*, "
                           "SLURM_*); use --np N")
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_mpiexec():
    local = Path(sys.executable).parent / "mpiexec"
    if local.exists():
        return str(local)
    return shutil.which("mpiexec")


def child_args(args, backend: str, result_file: str, cohost=()) -> list:
    out = ["-b", str(args.minbytes), "-e", str(args.maxbytes), "-f", repr(args.stepfactor),
           "-c", str(args.check), "-d", args.datatype, "-o", args.op, "-t", str(args.trials),
           "--timeout", repr(args.timeout), "--backend", backend, "--result-file", result_file]
    if cohost:
        out += ["--cohost", ",".join(cohost)]
    if getattr(args, "device", "cpu") != "cpu":
        out += ["--device", args.device]
    if args.iters is not None:
        out += ["-n", str(args.iters)]
    if args.warmup_iters is not None:
        out += ["-w", str(args.warmup_iters)]
    return out


_LIVE = set()          # Popen objects to kill if we exit early


def _kill(proc) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            try:
                proc.kill()
            except ProcessLookupError:
                pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    _LIVE.discard(proc)


def _kill_all_live() -> None:
    for proc in list(_LIVE):
        _kill(proc)


atexit.register(_kill_all_live)


def run_procs(cmds_envs, timeout_s: float, grace_s: float = 15.0):
    """Start the commands (each its own process group), wait for all with a deadline.

    Returns (status, reason). When one exits non-zero the rest get grace_s, then are killed.
    """
    events = queue.Queue()
    procs = []
    try:
        for cmd, env in cmds_envs:
            p = subprocess.Popen(cmd, env=env, start_new_session=True, cwd=str(REPO_ROOT))
            _LIVE.add(p)
            procs.append(p)
            threading.Thread(target=lambda p=p: events.put((p, p.wait())), daemon=True).start()
    except OSError as e:
        for p in procs:
            _kill(p)
        return "failed", f"could not start {cmds_envs[0][0][0]}: {e}"
    deadline = time.monotonic() + timeout_s
    pending, failures = set(procs), []
    status, reason = "ok", ""
    while pending:
        remaining = deadline - time.monotonic()
        if failures:
            remaining = min(remaining, grace_s)
        try:
            p, rc = events.get(timeout=max(remaining, 0.001))
        except queue.Empty:
            if failures:
                status = "failed"
                reason = (f"rank exited with {failures[0]}; the other ranks did not finish "
                          f"within {grace_s:.0f} s and were killed")
            else:
                status, reason = "timeout", f"did not finish within {timeout_s:.0f} s; killed"
            break
        pending.discard(p)
        if rc != 0:
            failures.append(rc)
    for p in procs:
        _kill(p)
    if status == "ok" and failures:
        wrong_only = all(rc == 1 for rc in failures)
        status = "wrong" if wrong_only else "failed"
        reason = ("ranks reported wrong values" if wrong_only
                  else f"process exit codes {sorted(set(failures))}")
    return status, reason


def launch(spec: CollSpec, args, backend: str, nranks: int, cohost=()) -> dict:
    """Run one backend's sweep on nranks local ranks; return its result dict with status.
    cohost: more backends measured in the same processes, trials interleaved (then the
    return value is {name: result dict with status}, one per backend)."""
    t0 = time.monotonic()
    names = [backend] + [b for b in cohost if b != backend]
    fd, result_file = tempfile.mkstemp(prefix=f"topocomm-bench-{backend}-", suffix=".json")
    os.close(fd)
    os.unlink(result_file)
    script = str(Path(spec.script).resolve())
    base_env = dict(os.environ)
    for keys in _LAUNCH_ENVS:
        for k in keys:
            base_env.pop(k, None)
    base_env.setdefault("OMP_NUM_THREADS", "1")       # as torchrun does for several ranks
    # numpy gives arrays of 4 MiB and more transparent huge pages (madvise), torch's CPU
    # allocator only with this set: without it the torch ranks (topocomm, gloo) move their
    # big buffers through 4 KiB pages while MPI's numpy buffers use 2 MiB ones, which made
    # every 64 MiB copy 20-30% slower on the torch side of the comparison (README's bench notes)
    base_env.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    base_env["PYTHONUNBUFFERED"] = "1"
    argv = child_args(args, backend, result_file, names[1:])
    if "mpi" in names:
        why = _mpi_missing()
        if why:
            return _missing(names, why)
        mpiexec = find_mpiexec()
        if names != ["mpi"]:           # torch groups beside MPI in the same ranks
            base_env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        cmds = [([mpiexec, "-n", str(nranks), sys.executable, script] + argv, base_env)]
    else:
        port = free_port()
        cmds = []
        for r in range(nranks):
            env = dict(base_env, RANK=str(r), WORLD_SIZE=str(nranks), LOCAL_RANK=str(r),
                       LOCAL_WORLD_SIZE=str(nranks), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
            cmds.append(([sys.executable, script] + argv, env))
    status, reason = run_procs(cmds, args.timeout * len(names))
    result = {"rows": []}
    try:
        result = json.loads(Path(result_file).read_text())
        os.unlink(result_file)
    except (OSError, ValueError):
        if status == "ok":
            status, reason = "failed", "rank 0 wrote no result"
    if len(names) > 1:
        parts = result.get("cohosted") or {}
        out = {}
        for name in names:
            part = dict(parts.get(name) or {"rows": []})
            if result.get("error"):
                part["error"] = result["error"]
            out[name] = _finish(part, status, reason, name, cmds, t0)
        return out
    return _finish(result, status, reason, backend, cmds, t0)


def _missing(names, reason):
    res = {"status": "missing", "reason": reason, "rows": []}
    return res if len(names) == 1 else {name: dict(res) for name in names}


def _finish(result, status, reason, backend, cmds, t0):
    if status in ("ok", "wrong") and not result.get("complete"):
        status, reason = "failed", "sweep incomplete"
    if result.get("error") and status != "ok":
        reason = f"{reason}; rank 0: {result['error']}"
    if status == "failed" and backend == "mpi":
        reason += f" (launched with {cmds[0][0][0]})"
    result["status"] = "ok" if status == "wrong" else status
    if status != "ok":
        result["reason"] = reason
    result["wall_s"] = time.monotonic() - t0
    return result


def _print_status(spec, name, res) -> None:
    if res["status"] != "ok":
        print(f"# {spec.name}: backend {name} {res['status'].upper()}: "
              f"{res.get('reason', '')}", flush=True)
    elif res.get("reason"):
        print(f"# {spec.name}: backend {name}: {res['reason']}", flush=True)
    print(flush=True)


def _mpi_missing():
    """None when MPI baselines can run here, else why not."""
    try:
        import mpi4py  # noqa: F401
    except ImportError as e:
        return f"mpi4py is not importable ({e})"
    return None if find_mpiexec() else "mpiexec not found (venv bin or PATH)"


def exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)      # runs atexit, which kills the spawned ranks


def launch_backends(spec: CollSpec, args, names: list, nranks: int) -> dict:
    """Run every backend of names on nranks local ranks: {name: result dict with status}, in
    the order of names. Without --separate they share one launch, trials interleaved, except
    topocomm-numpy beside a torch backend (its own launch) and MPI where it cannot run here
    (MISSING); each backend's status is printed once its launch is over."""
    backends = {}
    if args.separate or len(names) == 1:
        for name in names:
            print(f"# ===== {spec.name}: backend {name}, {nranks} local ranks "
                  f"(timeout {args.timeout:.0f} s) =====", flush=True)
            backends[name] = launch(spec, args, name, nranks)
            _print_status(spec, name, backends[name])
    else:
        together = list(names)
        if "mpi" in together and args.backend != "mpi":
            why = _mpi_missing()
            if why:                               # the others still run, side by side
                backends["mpi"] = {"status": "missing", "reason": why, "rows": []}
                together.remove("mpi")
        # comms.init() bootstraps from MASTER_ADDR/PORT like torch does: it cannot share the
        # ranks with a torch group on the same port, so it runs in its own launch
        alone = [b for b in together if b == "topocomm-numpy" and
                 {"topocomm", "gloo"} & set(together)]
        for name in alone:
            together.remove(name)
            print(f"# ===== {spec.name}: backend {name}, {nranks} local ranks, its own launch "
                  f"(timeout {args.timeout:.0f} s) =====", flush=True)
            backends[name] = launch(spec, args, name, nranks)
        print(f"# ===== {spec.name}: backends {', '.join(together)} in the same {nranks} local "
              f"ranks, trials interleaved (timeout {args.timeout * len(together):.0f} s) =====",
              flush=True)
        res = launch(spec, args, together[0], nranks, together[1:])
        backends.update(res if len(together) > 1 else {together[0]: res})
        backends = {name: backends[name] for name in names}
        for name in names:
            _print_status(spec, name, backends[name])
    return backends
