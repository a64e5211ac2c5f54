"""Every TOPOCOMM_* variable is parsed in one place (topology/env.py): a bad value is a
ValueError naming the variable and what it accepts, raised where the library reads it."""
import numpy as np
import pytest

from topology import env

BAD = {
    "TOPOCOMM_PURE_PYTHON": ["maybe", "2"],
    "TOPOCOMM_ALGO": ["ring", "allreduce=ring", "allreduce:ring;small", "all reduce:ring"],
    "TOPOCOMM_CMA": ["sometimes", "2"],
    "TOPOCOMM_CUDA_PATH": ["ipc", "nccl", "1"],
    "TOPOCOMM_TIMEOUT": ["abc", "-1", "0", "inf", "nan", "5s"],
    "TOPOCOMM_HOST_ID": ["   "],
    "TOPOCOMM_SOCKET_IFNAME": ["eth0 eth1", "eth0,,", "^"],
    "TOPOCOMM_SOCKET_NSTREAMS": ["two", "0", "-1", "1000", "2.5"],
    "TOPOCOMM_TOPO_FILE": ["  "],
    "TOPOCOMM_TOPO_DUMP_FILE": ["  "],
    "TOPOCOMM_MOE_CACHE_MB": ["lots", "-5", "inf"],
    "TOPOCOMM_PROBE": ["please"],
    "TOPOCOMM_PROBE_CACHE": ["  "],
    "TOPOCOMM_CALIBRATE": ["sometimes", "2"],
    "TOPOCOMM_STRAGGLER_WARN": ["0", "-1", "soon", "inf"],
    "TOPOCOMM_DEBUG": ["LOUD", "1"],
    "TOPOCOMM_DEBUG_FILE": ["  "],
}
GOOD = {
    "TOPOCOMM_PURE_PYTHON": [("1", True), ("0", False), ("yes", True)],
    "TOPOCOMM_ALGO": [("allreduce:ring; alltoall:staged", (("allreduce", "ring"),
                                                          ("alltoall", "staged")))],
    "TOPOCOMM_CMA": [("auto", "auto"), ("0", "off"), ("OFF", "off")],
    "TOPOCOMM_CUDA_PATH": [("auto", "auto"), ("Staged", "staged")],
    "TOPOCOMM_TIMEOUT": [("300", 300.0), ("2.5", 2.5)],
    "TOPOCOMM_HOST_ID": [("hostA", "hostA")],
    "TOPOCOMM_SOCKET_IFNAME": [("eth,ib", "eth,ib"), ("^docker,lo", "^docker,lo"),
                               ("=eth0", "=eth0")],
    "TOPOCOMM_SOCKET_NSTREAMS": [("4", 4)],
    "TOPOCOMM_TOPO_FILE": [("/tmp/t.json", "/tmp/t.json")],
    "TOPOCOMM_TOPO_DUMP_FILE": [("/tmp/d.json", "/tmp/d.json")],
    "TOPOCOMM_MOE_CACHE_MB": [("0", 0.0), ("512", 512.0)],
    "TOPOCOMM_PROBE": [("1", True)],
    "TOPOCOMM_PROBE_CACHE": [("/tmp/cache", "/tmp/cache")],
    "TOPOCOMM_CALIBRATE": [("1", True), ("off", False)],
    "TOPOCOMM_STRAGGLER_WARN": [("20", 20.0), ("0.5", 0.5)],
    "TOPOCOMM_DEBUG": [("info", "INFO"), ("TRACE", "TRACE"), ("warn", "WARNING")],
    "TOPOCOMM_DEBUG_FILE": [("/tmp/t-%h-%p.log", "/tmp/t-%h-%p.log")],
}


def test_the_tables_cover_every_variable():
    assert set(BAD) == set(GOOD) == set(env.VARIABLES)


@pytest.mark.parametrize("name, text", [(n, t) for n, ts in BAD.items() for t in ts])
def test_a_bad_value_names_the_variable_and_what_it_accepts(name, text):
    with pytest.raises(ValueError, match=f"^{name}: expected .+, got "):
        env.get(name, {name: text})


@pytest.mark.parametrize("name, text, value", [(n, t, v) for n, ts in GOOD.items()
                                               for t, v in ts])
def test_good_values_and_defaults(name, text, value):
    assert env.get(name, {name: text}) == value
    assert env.get(name, {}) == env.get(name, {name: ""}) == env.VARIABLES[name].default


def test_check_all_parses_what_is_set_and_lists_unknown_names():
    assert env.check_all({"TOPOCOMM_TIMEOUT": "5", "TOPOCOMM_TIMEOUTT": "5", "PATH": "/"}) == \
        ["TOPOCOMM_TIMEOUTT"]
    with pytest.raises(ValueError, match="TOPOCOMM_SOCKET_NSTREAMS"):
        env.check_all({"TOPOCOMM_SOCKET_NSTREAMS": "many"})


# where the library reads them: the error surfaces there, naming the variable
@pytest.mark.parametrize("name, text, call", [
    ("TOPOCOMM_TIMEOUT", "abc", lambda: __import__("comms").api.communicator.default_timeout()),
    ("TOPOCOMM_ALGO", "ring", lambda: __import__("comms").plan.select.Selector(2, 1 << 16)),
    ("TOPOCOMM_SOCKET_NSTREAMS", "0",
     lambda: __import__("comms").plan.select.MultiHostSelector([[0], [1]])),
    ("TOPOCOMM_MOE_CACHE_MB", "lots", lambda: __import__("comms.moe.cache").moe.cache.cap_bytes()),
    ("TOPOCOMM_CMA", "sometimes", lambda: __import__("comms.transport.shm").transport.shm.cma_wanted()),
    ("TOPOCOMM_PROBE", "please", lambda: __import__("topology.probe").probe.is_enabled()),
    ("TOPOCOMM_HOST_ID", " ", lambda: __import__("topology.host").host.host_id()),
])
def test_consumers_raise_naming_the_variable(monkeypatch, name, text, call):
    import comms.api.communicator  # noqa: F401
    import comms.plan.select  # noqa: F401
    monkeypatch.setenv(name, text)
    with pytest.raises(ValueError, match=f"^{name}: "):
        call()


def test_a_thread_world_under_a_bad_setting_fails_at_once(monkeypatch):
    from comms.testing import ThreadWorld
    monkeypatch.setenv("TOPOCOMM_ALGO", "allreduce")
    with pytest.raises(ValueError, match="TOPOCOMM_ALGO"):
        ThreadWorld(2, timeout=10.0)
    monkeypatch.delenv("TOPOCOMM_ALGO")
    with ThreadWorld(2, timeout=10.0) as w:                # and nothing was left behind
        assert [x.tolist() for x in w.run(lambda c: c.allreduce(np.ones(1)))] == [[2.0]] * 2
