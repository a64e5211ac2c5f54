"""Fast tests of the pure parts of the benchmark harness (no ranks, no torch, no MPI)."""
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import all_reduce_perf  # noqa: E402
import alltoall_perf  # noqa: E402
import harness  # noqa: E402


# ------------------------------------------------------------------------------ sizes
@pytest.mark.parametrize("text,value", [
    ("8", 8), ("0", 0), ("64K", 65536), ("64k", 65536), ("256M", 256 << 20), ("1G", 1 << 30),
    ("4KB", 4096), ("2MiB", 2 << 20), ("0.5K", 512), (17, 17),
])
def test_parse_size(text, value):
    assert harness.parse_size(text) == value


@pytest.mark.parametrize("bad", ["", "M", "12Q", "-4", "1.3"])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError, match="size"):
        harness.parse_size(bad)


def test_size_list_nccl_tests_semantics():
    assert harness.size_list(8, 256 << 20, 4)[:4] == [8, 32, 128, 512]
    assert harness.size_list(8, 256 << 20, 4)[-1] == 128 << 20      # stops at <= maxbytes
    assert harness.size_list(8, 256 << 20, 2)[-1] == 256 << 20
    assert len(harness.size_list(8, 256 << 20, 2)) == 26
    assert harness.size_list(1024, 1024, 2) == [1024]
    with pytest.raises(ValueError):
        harness.size_list(8, 64, 1)
    with pytest.raises(ValueError):
        harness.size_list(64, 8, 2)


def test_auto_iters_scale_down_with_size():
    iters = [harness.auto_iters(s) for s in harness.size_list(8, 256 << 20, 2)]
    assert iters[0] == 50 and iters[-1] == 2
    assert all(a >= b for a, b in zip(iters, iters[1:]))
    assert all(harness.auto_warmup(i) >= 1 for i in iters)


def test_parse_dtype_and_ops():
    assert harness.parse_dtype("float32").name == "float"
    assert harness.parse_dtype("float").itemsize == 4
    assert harness.parse_dtype("bfloat16").np_name is None
    assert harness.parse_dtype("float16").name == "half"
    assert harness.parse_dtype("double").itemsize == 8
    for name in ("int32", "int64", "int8", "uint8"):
        assert harness.parse_dtype(name).name == name
    with pytest.raises(ValueError, match="datatype"):
        harness.parse_dtype("complex64")
    assert harness.parse_ops("all") == ["sum", "prod", "min", "max", "avg"]
    assert harness.parse_ops("max") == ["max"]
    with pytest.raises(ValueError, match="op"):
        harness.parse_ops("xor")


# ------------------------------------------------------------------------------ bandwidth
def test_busbw_factors():
    ar, a2a = all_reduce_perf.SPEC, alltoall_perf.SPEC
    assert ar.busbw_factor(1) == 0.0
    assert ar.busbw_factor(2) == 1.0
    assert ar.busbw_factor(4) == 1.5
    assert ar.busbw_factor(8) == pytest.approx(1.75)
    assert a2a.busbw_factor(2) == 0.5
    assert a2a.busbw_factor(8) == pytest.approx(0.875)


def test_algbw_busbw_math():
    # 1 MiB in 1000 us = 1.048576 GB/s (1e9 bytes per GB, as nccl-tests)
    res = harness.make_result(1 << 20, 1000.0, 1.5, 0)
    assert res["algbw_gbs"] == pytest.approx(1.048576)
    assert res["busbw_gbs"] == pytest.approx(1.048576 * 1.5)
    assert harness.algbw_gbs(100, 0.0) == 0.0


def test_alltoall_count_alignment():
    assert alltoall_perf.SPEC.align_count(2, 2) == 2
    assert alltoall_perf.SPEC.align_count(7, 3) == 6
    assert alltoall_perf.SPEC.align_count(1, 4) == 0
    assert all_reduce_perf.SPEC.align_count(7, 3) == 7


# ------------------------------------------------------------------------------ formatting
HEAD = ("#       size         count      type   redop    root     time   algbw   busbw #wrong"
        "     time   algbw   busbw #wrong")
UNITS = ("#        (B)    (elements)                               (us)  (GB/s)  (GB/s)"
         "            (us)  (GB/s)  (GB/s)")


def test_header_is_exactly_nccl_tests():
    lines = harness.header_lines()
    assert HEAD in lines and UNITS in lines
    assert lines.index(HEAD) + 1 == lines.index(UNITS)


def test_format_time_precision():
    assert harness.format_time(12.3456) == "  12.35"
    assert harness.format_time(123.456) == "  123.5"
    assert harness.format_time(12345.6) == "  12346"


def test_row_columns_align_with_header():
    row = {"size": 268435456, "count": 67108864, "type": "float", "redop": "sum", "root": -1,
           "oop": harness.make_result(268435456, 132349.0, 1.0, 0),
           "ip": harness.make_result(268435456, 130000.0, 1.0, 3)}
    line = harness.format_row(row)
    assert len(line) == len(HEAD)
    fields = line.split()
    assert fields[:5] == ["268435456", "67108864", "float", "sum", "-1"]
    assert fields[5:9] == ["132349", "2.03", "2.03", "0"]
    assert fields[12] == "3"
    # each value ends where its header label ends
    for label, value in (("size", "268435456"), ("count", "67108864"), ("root", "-1")):
        assert HEAD.index(label) + len(label) == line.index(value) + len(value)
    assert line.rstrip().endswith("3") and len(line.rstrip()) == len(HEAD)


def test_row_without_check_prints_na():
    row = {"size": 8, "count": 2, "type": "float", "redop": "sum", "root": -1,
           "oop": harness.make_result(8, 5.0, 1.0, None),
           "ip": harness.make_result(8, 5.0, 1.0, None)}
    assert harness.format_row(row).split()[8] == "N/A"


def test_footer():
    rows = [{"oop": harness.make_result(1 << 20, 1000.0, 1.0, 0),
             "ip": harness.make_result(1 << 20, 500.0, 1.0, 0)}]
    foot = harness.footer_lines(rows, True)
    assert foot[0] == "# Out of bounds values : 0 OK"
    assert foot[1].startswith("# Avg bus bandwidth    : ")
    assert float(foot[1].split(":")[1]) == pytest.approx((1.048576 + 2.097152) / 2, rel=1e-5)
    rows[0]["ip"]["wrong"] = 2
    assert harness.footer_lines(rows, True)[0] == "# Out of bounds values : 2 FAILED"


def _rows(times):
    return [{"size": s, "count": s // 4, "type": "float", "redop": "sum", "root": -1,
             "oop": harness.make_result(s, t, 1.0, 0), "ip": harness.make_result(s, t, 1.0, 0)}
            for s, t in times]


def test_summary_table_speedups_and_missing_baseline():
    backends = {
        "topocomm": {"status": "ok", "rows": _rows([(8, 10.0), (1024, 20.0)])},
        "gloo": {"status": "ok", "rows": _rows([(8, 500.0), (1024, 40.0)])},
        "mpi": {"status": "missing", "reason": "mpiexec not found", "rows": []},
    }
    lines = harness.summary_table("topocomm", backends)
    assert "vs gloo" in lines[0] and "vs mpi" in lines[0]
    first = lines[1].split()
    assert first[0] == "8" and "50.00x" in first and first[-1] == "-"
    assert "2.00x" in lines[2].split()
    assert any(ln.startswith("# mpi: MISSING - mpiexec not found") for ln in lines)
    recs = harness.summary_records("topocomm", backends)
    assert recs[0]["speedup_vs_gloo_oop"] == pytest.approx(50.0)
    assert recs[0]["speedup_vs_mpi_oop"] is None


# ------------------------------------------------------------------------------ #wrong
def _simulate(spec, nranks, count, dt, op):
    """Run the collective in numpy on the spec's own inputs; check against its expected."""
    ins = [spec.inputs(r, nranks, count, dt, op).astype(np.float64) for r in range(nranks)]
    outs = []
    for r in range(nranks):
        if spec.name == "all_reduce":
            stack = np.stack(ins)
            red = {"sum": stack.sum(0), "avg": stack.sum(0) / nranks, "prod": stack.prod(0),
                   "min": stack.min(0), "max": stack.max(0)}[op]
            outs.append(red)
        else:
            c = count // nranks
            outs.append(np.concatenate([ins[s][r * c:(r + 1) * c] for s in range(nranks)]))
    return outs


@pytest.mark.parametrize("dtype", ["float", "half", "bfloat16", "double", "int32", "int64",
                                   "int8", "uint8"])
@pytest.mark.parametrize("op", ["sum", "prod", "min", "max", "avg"])
@pytest.mark.parametrize("nranks", [1, 2, 3, 5, 8])
def test_all_reduce_expected_matches_reference(dtype, op, nranks):
    dt = harness.parse_dtype(dtype)
    if op == "avg" and not dt.is_float:
        pytest.skip("avg is for floats")
    spec = all_reduce_perf.SPEC
    count = 1013
    outs = _simulate(spec, nranks, count, dt, op)
    for r in range(nranks):
        exp = spec.expected(r, nranks, count, dt, op)
        assert exp.shape == (count,)
        res = outs[r] if op == "avg" else outs[r].astype(dt.gen_np)
        assert harness.count_wrong(res, exp, dt, op) == 0
        if op != "avg":
            # exact in the datatype: the reference in float64 equals the typed expected value
            assert np.array_equal(outs[r], exp.astype(np.float64))
            assert exp.min() >= 1          # zeros in an untouched buffer always count as wrong


@pytest.mark.parametrize("dtype", ["float", "bfloat16", "int8", "uint8"])
@pytest.mark.parametrize("nranks", [1, 2, 3, 4, 8])
def test_alltoall_expected_matches_reference(dtype, nranks):
    dt = harness.parse_dtype(dtype)
    spec = alltoall_perf.SPEC
    count = spec.align_count(1000, nranks)
    outs = _simulate(spec, nranks, count, dt, "none")
    for r in range(nranks):
        exp = spec.expected(r, nranks, count, dt, "none")
        assert harness.count_wrong(outs[r].astype(dt.gen_np), exp, dt, "none") == 0


def test_alltoall_detects_swapped_blocks():
    dt = harness.parse_dtype("float")
    spec = alltoall_perf.SPEC
    n, count = 4, 64
    exp = spec.expected(1, n, count, dt, "none")
    c = count // n
    swapped = exp.copy()
    swapped[:c], swapped[c:2 * c] = exp[c:2 * c], exp[:c].copy()
    assert harness.count_wrong(swapped, exp, dt, "none") == 2 * c


@pytest.mark.parametrize("dtype", ["float", "half", "int8"])
def test_count_wrong_detects_one_corrupted_element(dtype):
    dt = harness.parse_dtype(dtype)
    spec = all_reduce_perf.SPEC
    exp = spec.expected(0, 2, 4099, dt, "sum")
    res = exp.copy()
    assert harness.count_wrong(res, exp, dt, "sum") == 0
    res[4097] += 1
    assert harness.count_wrong(res, exp, dt, "sum") == 1
    res[0] = 0
    assert harness.count_wrong(res, exp, dt, "sum") == 2
    assert harness.count_wrong(res[:-1], exp, dt, "sum") == 4099   # wrong length: all wrong


def test_count_wrong_avg_tolerance():
    dt = harness.parse_dtype("float")
    exp = np.array([1 / 3, 2 / 3, 1.0])
    assert harness.count_wrong(exp.astype(np.float32), exp, dt, "avg") == 0
    bad = exp.astype(np.float32)
    bad[1] = 0.7
    assert harness.count_wrong(bad, exp, dt, "avg") == 1


def test_world_from_env():
    assert harness.world_from_env({"RANK": "1", "WORLD_SIZE": "4"}) == (1, 4)
    assert harness.world_from_env({"PMI_RANK": "0", "PMI_SIZE": "2"}) == (0, 2)
    assert harness.world_from_env({"OMPI_COMM_WORLD_RANK": "3",
                                   "OMPI_COMM_WORLD_SIZE": "8"}) == (3, 8)
    assert harness.world_from_env({"SLURM_PROCID": "2", "SLURM_NTASKS": "3"}) == (2, 3)
    assert harness.world_from_env({}, required=False) is None
    with pytest.raises(RuntimeError):
        harness.world_from_env({})


def test_child_args_round_trip():
    args = harness.parse_args(["-b", "8", "-e", "256M", "-f", "4", "-n", "5", "-o", "all",
                               "-d", "int8", "--np", "2", "--vs", "gloo,mpi"])
    child = harness.parse_args(harness.child_args(args, "gloo", "/tmp/x.json"))
    for key in ("minbytes", "maxbytes", "stepfactor", "iters", "warmup_iters", "check",
                "datatype", "op", "trials", "timeout"):
        assert getattr(child, key) == getattr(args, key), key
    assert child.backend == "gloo" and child.result_file == "/tmp/x.json"
    assert child.np is None and child.vs == ""


# ------------------------------------------------------------------------------ interleaved sweeps
class _OneRank(harness.NumpyBackend):
    """A 1-rank backend: all_reduce of one rank is a copy; `bias` makes it wrong on purpose."""

    def __init__(self, name, log, bias=0):
        self.name, self.log, self.bias = name, log, bias
        self.rank, self.size, self.notes = 0, 1, ""

    def barrier(self):
        self.log.append(self.name)          # one barrier opens each timed trial (and a check)

    def reduce_scalar(self, value, op):
        return value

    def all_reduce(self, send, recv, op):
        dst = send if recv is None else recv
        np.copyto(dst, send)
        dst += self.bias

    def close(self):
        pass


def test_interleaved_sweep_takes_each_trial_on_every_backend_in_turn():
    log = []
    bes = [_OneRank("a", log), _OneRank("b", log), _OneRank("c", log, bias=1)]
    args = harness.parse_args(["-b", "64", "-e", "64", "-t", "3", "-n", "2", "-w", "1"])
    outs = [harness.Rank0Printer(0, hold=True) for _ in bes]
    res = harness.run_sweeps(all_reduce_perf.SPEC, args, bes, outs)
    assert list(res) == ["a", "b", "c"]
    # per mode: 3 trials, each on a, b, c with a rotating first backend, then one check each
    per_mode = ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert log == per_mode + per_mode
    for name in "ab":
        row = res[name]["rows"][0]
        assert row["size"] == 64 and len(row["oop"]["trials_us"]) == 3
        assert row["oop"]["wrong"] == 0 and row["ip"]["wrong"] == 0
        assert res[name]["interleaved_with"] == [b for b in "abc" if b != name]
        assert res[name]["complete"] and res[name]["wrong_total"] == 0
    assert res["c"]["rows"][0]["oop"]["wrong"] == 16      # every element of the wrong one
    assert res["c"]["wrong_total"] == 32
    # each backend keeps its own nccl-tests table
    for out, name in zip(outs, "abc"):
        assert any(f"backend: {name}" in line for line in out.held)
        assert sum(line.strip().startswith("64 ") for line in out.held) == 1


def test_single_backend_sweep_is_unchanged():
    log = []
    args = harness.parse_args(["-b", "8", "-e", "32", "-t", "2", "-n", "1", "-w", "0"])
    res = harness.run_sweep(all_reduce_perf.SPEC, args, _OneRank("a", log),
                            harness.Rank0Printer(0, hold=True))
    assert [r["size"] for r in res["rows"]] == [8, 16, 32]
    assert "interleaved_with" not in res and res["wrong_total"] == 0
    assert log == ["a"] * (3 * 2 * 3)                 # sizes x modes x (2 trials + check)


def test_separate_flag_and_cohost_round_trip():
    args = harness.parse_args(["--np", "2", "--vs", "gloo,mpi", "--separate"])
    assert args.separate
    child = harness.parse_args(harness.child_args(args, "topocomm", "/tmp/x.json",
                                                  ["gloo", "mpi"]))
    assert child.cohost == "gloo,mpi" and child.backend == "topocomm"
    assert harness.parse_args(harness.child_args(args, "gloo", "/tmp/x.json")).cohost == ""


def test_hbm_limit_lines_divide_each_time_by_the_limit():
    import output
    backends = {"topocomm": {"rows": [{"size": 8, "oop": {"time_us": 30.0}, "ip": None},
                                      {"size": 64 << 20, "oop": {"time_us": 268.4},
                                       "ip": {"time_us": 134.2}}]},
                "gloo": {"rows": [{"size": 64 << 20, "oop": {"time_us": 45000.0},
                                   "ip": None}]},
                "mpi": {"status": "missing", "rows": []}}
    lines = output.hbm_lines(all_reduce_perf.AllReduceSpec, backends, 4, 4000.0)
    assert "HBM limit = 2 x 4 x size / 4000 GB/s" in lines[0]
    assert "topocomm oop/ip" in lines[1] and "gloo oop/ip" in lines[1] and "mpi" not in lines[1]
    # 64 MiB on 4 ranks: 2 x 4 x 64 MiB / 4000 GB/s = 134.2 us; 8 B is below the table
    assert len(lines) == 3
    size, limit, ours, gloo = lines[2].split()
    assert int(size) == 64 << 20 and abs(float(limit) - 134.22) < 0.01
    assert ours == "2.0/1.0" and gloo == "335.3/-"
