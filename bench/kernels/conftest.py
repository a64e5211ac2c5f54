"""The rate table at the end of a kernel benchmark run: GB/s (bytes read + written per call
over the median time) and the share of the machine's copy rate (the copy_numpy row of the
same size), next to pytest-benchmark's own table."""
import pytest

RATES = []


@pytest.fixture
def timed(benchmark):
    """timed(nbytes, fn, *args): benchmark fn(*args), moving nbytes per call."""
    def run(nbytes, fn, *args):
        benchmark.extra_info["bytes"] = int(nbytes)
        benchmark(fn, *args)
        median = benchmark.stats.stats.median
        RATES.append((benchmark.name, int(nbytes), median))
    return run


def pytest_configure(config):
    config.addinivalue_line("markers", "kernel_bench: kernel micro-benchmarks (bench/kernels)")


def pytest_terminal_summary(terminalreporter):
    if not RATES:
        return
    copy = {}
    for name, nbytes, median in RATES:
        if name.startswith("test_copy_numpy"):
            copy[name.split("[", 1)[1].rstrip("]")] = nbytes / median
    w = terminalreporter.write_line
    w("")
    w(f"{'kernel':<46} {'bytes':>11} {'median us':>10} {'GB/s':>8} {'x copy':>7}")
    for name, nbytes, median in sorted(RATES):
        rate = nbytes / median
        size = next((s for s in copy if f"{s}" in name), None)
        share = f"{rate / copy[size]:.2f}" if size else "-"
        w(f"{name:<46} {nbytes:>11} {median * 1e6:>10.1f} {rate / 1e9:>8.2f} {share:>7}")
