import os

import pytest


def pytest_report_header(config):
    from comms.kernels import native
    native.impl()
    return f"topocomm data path: {'native C' if native.is_native else 'numpy fallback'}" + (
        f" ({native.why_not_native})" if native.why_not_native else "")


@pytest.fixture(scope="session")
def worlds():
    """ThreadWorld per world size, created on first use and reused by every test."""
    from comms.testing import ThreadWorld
    made = {}

    def get(n):
        if n not in made:
            made[n] = ThreadWorld(n, timeout=30.0)
        return made[n]
    yield get
    for w in made.values():
        w.close()
