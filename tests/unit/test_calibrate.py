"""Self-calibration (comms/plan/calibrate.py): the probe measures every rate, the cache is
per machine and written atomically, the model scales its written-in constants by this
machine's probe over the reference machine's, and explain says which numbers are measured
and which are the fallback."""
import json

import pytest

from comms.kernels import native
from comms.plan import calibrate, cost
from comms.plan.select import Selector


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TOPOCOMM_PROBE_CACHE", str(tmp_path))
    calibrate.forget()
    yield tmp_path
    calibrate.forget()


def _fake(values):
    return calibrate.Calibration(values, calibrate.machine(), "2026-01-01 00:00:00 UTC", 0.1)


def test_probe_measures_every_rate_and_the_cache_round_trips(cache):
    native.impl()
    if not native.is_native:
        pytest.skip("the probe times the C kernels")
    cal = calibrate.measure(trials=2)
    assert {"cpu_gbs", "dram_gbs"} <= set(cal.values)
    assert all(v > 0 for v in cal.values.values())
    path = calibrate.save(cal)
    assert path.startswith(str(cache)) and calibrate.key(cal.machine) in path
    back = calibrate.load()
    assert back is not None and back.values == pytest.approx(cal.values)
    assert back.when == cal.when


def test_another_machine_or_version_is_not_loaded(cache):
    cal = _fake({"cpu_gbs": 10.0})
    path = calibrate.save(cal)
    data = json.loads(open(path).read())
    data["machine"]["kernel"] = "another"
    open(path, "w").write(json.dumps(data))
    assert calibrate.load() is None
    data["machine"] = calibrate.machine()
    data["version"] = 0
    open(path, "w").write(json.dumps(data))
    assert calibrate.load() is None


def test_the_model_uses_measured_rates_and_scales_the_fitted_one_and_says_so():
    ref = calibrate.REFERENCE
    cal = _fake({"cpu_gbs": 70.0, "dram_gbs": 13.0, "xcore_gbs": 2 * ref["xcore_gbs"]})
    m = cost.ShmModel(2, 2, calibration=cal)
    assert m.cpu_gbs == 70.0 and m.dram_gbs == 13.0                   # DIRECT: as measured
    assert m.xcore_gbs == pytest.approx(2 * cost.XCORE_GBS.value)      # SCALED: x probe ratio
    assert m.cma_gbs == pytest.approx(cost.CMA_GBS.value)              # not measured: fallback
    assert "as measured" in m.sources["cpu_gbs"][2] and "2026-01-01" in m.sources["cpu_gbs"][2]
    assert "x 2.00" in m.sources["xcore_gbs"][2]
    assert "written-in fallback" in m.sources["cma_gbs"][2]
    text = Selector(2, 64 << 10, calibration=cal).explain("allreduce", 64 << 20)
    assert "dram_gbs" in text and "as measured" in text
    assert "written-in fallback" in Selector(2, 64 << 10).explain("allreduce", 64 << 20)
    # a slower memory makes the large all-reduce slower in the model
    assert (Selector(2, 64 << 10, calibration=cal).choose("allreduce", 64 << 20).estimate_us
            > Selector(2, 64 << 10).choose("allreduce", 64 << 20).estimate_us)


def test_current_follows_topocomm_calibrate(cache, monkeypatch):
    monkeypatch.setenv("TOPOCOMM_CALIBRATE", "0")
    calibrate.save(_fake({"cpu_gbs": 1.0}))
    assert calibrate.current() is None                 # 0: the cache is ignored
    calibrate.forget()
    monkeypatch.delenv("TOPOCOMM_CALIBRATE")
    assert calibrate.current().values == {"cpu_gbs": 1.0}     # default: the cache when present


def test_calibrate_1_measures_once_when_there_is_no_cache(cache, monkeypatch):
    monkeypatch.setenv("TOPOCOMM_CALIBRATE", "1")
    monkeypatch.setattr(calibrate, "measure", lambda trials=7: _fake({"cpu_gbs": 3.0}))
    assert calibrate.current().values == {"cpu_gbs": 3.0}
    assert calibrate.load().values == {"cpu_gbs": 3.0}


def test_cli_calibrate_prints_each_rate_beside_its_fallback(cache, capsys):
    from comms.cli import main
    rc = main(["calibrate", "--dry-run", "--trials", "2"])
    out, err = capsys.readouterr()
    native.impl()
    if not native.is_native:
        assert rc == 2 and "C helpers are not loaded" in err
        return
    assert rc == 0, err
    for name in calibrate.RATES + calibrate.SIZES:
        assert name in out
    assert "not written: --dry-run" in out and not list(cache.iterdir())
