# The two commands of the README:
#   make bench   set up .venv, build the C helpers, run the nccl-tests-style sweeps vs gloo and MPI
#   make test    same set-up, then the suite twice: native (asserted loaded), then pure Python
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
# torch is pinned here only: pip takes the CPU build that lies on disk; an unpinned torch
# would pull a multi-GB CUDA build. pyproject.toml accepts a range for users.
DEPS    := torch==2.13.0 numpy mpi4py mpich matplotlib pytest pytest-timeout pytest-benchmark hypothesis setuptools wheel
PYTEST  := $(PY) -m pytest -q -p no:cacheprovider

.PHONY: bench bench-kernels test setup

$(VENV)/.deps: Makefile
	python3 -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check $(DEPS)
	touch $@

# rebuilt every time: cheap, and a stale extension must never be tested
setup: $(VENV)/.deps
	$(PIP) install -q --disable-pip-version-check --no-build-isolation --no-deps -e . 2>&1 | grep -v "^$$" || true
	$(PY) -c "import comms.kernels.native as n; n.impl(); print('topocomm C helpers:', 'loaded' if n.is_native else 'NOT loaded: ' + n.why_not_native)"

test: setup
	TOPOCOMM_REQUIRE_NATIVE=1 $(PYTEST) tests
	TOPOCOMM_PURE_PYTHON=1 $(PYTEST) tests

bench: setup
	$(PY) bench/main.py
	$(MAKE) --no-print-directory bench-kernels

# the C kernels against numpy/torch and the copy rate (pytest-benchmark; not in `make test`)
bench-kernels: setup
	$(PYTEST) bench/kernels --benchmark-columns=min,median,max --benchmark-sort=name
