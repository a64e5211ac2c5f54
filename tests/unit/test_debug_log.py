"""TOPOCOMM_DEBUG: what a group logs, to a file per process (TOPOCOMM_DEBUG_FILE)."""
import os

import numpy as np
import pytest

from comms.core import log as comms_log
from comms.core.errors import CommTimeoutError
from comms.testing import ThreadWorld


@pytest.fixture
def debug_file(monkeypatch, tmp_path):
    def setup(level):
        monkeypatch.setenv("TOPOCOMM_DEBUG", level)
        monkeypatch.setenv("TOPOCOMM_DEBUG_FILE", str(tmp_path / "topocomm-%h-%p.log"))
        return tmp_path
    yield setup
    monkeypatch.delenv("TOPOCOMM_DEBUG", raising=False)
    monkeypatch.delenv("TOPOCOMM_DEBUG_FILE", raising=False)
    comms_log.configure()               # the handler goes, the logger is the app's again
    assert not [h for h in comms_log.log.handlers if getattr(h, "topocomm_debug", False)]


def text_of(folder):
    files = list(folder.iterdir())
    assert len(files) == 1 and str(os.getpid()) in files[0].name, files
    return files[0].read_text()


def test_info_logs_creation_first_choices_and_errors(debug_file):
    folder = debug_file("INFO")
    with ThreadWorld(2, timeout=1.0) as w:
        w.run(lambda c: [c.allreduce(np.ones(n, np.float32)) for n in (4, 5, 4, 100_000)])

        def one_silent(c):
            if c.rank == 0:
                with pytest.raises(CommTimeoutError):
                    c.barrier()
        w.run(one_silent)
    text = text_of(folder)
    assert text.count("created: one host, ThreadsTransport") == 2
    assert text.count("choice: allreduce of 16 B -> small") == 2      # once per bucket and rank
    assert "choice: allreduce of 20 B" not in text                      # same bucket as 16 B
    assert "choice: allreduce of 400000 B -> ring" in text
    assert "the group is broken: " in text and "did not respond" in text
    assert "TRACE" not in text and "secret" not in text.lower()


def test_trace_logs_every_collective_with_its_time(debug_file):
    folder = debug_file("TRACE")
    with ThreadWorld(2) as w:
        w.run(lambda c: [c.allreduce(np.ones(4, np.float32)) for _ in range(3)])
    text = text_of(folder)
    for op in (1, 2, 3):                 # the latency path too: every call is logged
        assert text.count(f"op {op} allreduce arrives") == 2
        assert text.count(f"op {op} done in") == 2


def test_bad_level_names_the_variable(monkeypatch):
    monkeypatch.setenv("TOPOCOMM_DEBUG", "LOUD")
    with pytest.raises(ValueError, match="TOPOCOMM_DEBUG: expected WARN, INFO or TRACE"):
        ThreadWorld(2)
