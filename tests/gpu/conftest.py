"""tests/gpu: run only where torch sees a GPU (the device machine); skipped elsewhere, so
`make test` reports them as skipped on CI."""
import pytest


def _gpu_reason():
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    return "" if torch.cuda.is_available() else "no GPU (torch.cuda.is_available() is False)"


def pytest_collection_modifyitems(config, items):
    why = _gpu_reason()
    if not why:
        return
    skip = pytest.mark.skip(reason=why)
    for item in items:
        if "/tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(skip)
