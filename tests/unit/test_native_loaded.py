"""`make test` runs the suite twice: first requiring the C helpers, then with
TOPOCOMM_PURE_PYTHON=1. This test makes the first run fail if the extension silently
did not load (as mpi4py/msgpack CI do)."""
import os

import pytest

from comms.kernels import native


def test_native_loaded_when_required():
    native.impl()
    if os.environ.get("TOPOCOMM_REQUIRE_NATIVE") == "1":
        assert native.is_native, f"C helpers did not load: {native.why_not_native}"
    elif os.environ.get("TOPOCOMM_PURE_PYTHON") == "1":
        assert not native.is_native
    else:
        pytest.skip("neither TOPOCOMM_REQUIRE_NATIVE nor TOPOCOMM_PURE_PYTHON set")
