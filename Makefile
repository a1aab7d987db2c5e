# The README's two commands, `make bench` and `make test`, do all the set-up on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The `nvcc` on PATH may be a wrapper that misleads torch: point at the real toolkit when it is there.
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
export HRNET_FAST_CUDA ?= auto
# Builds in this tree are serialised: several shells may ask at once.
BUILD_LOCK := flock $(CURDIR)/.build.lock

SOURCES := setup.py $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' 2>/dev/null)

.PHONY: setup ext test test-fast test-triton bench clean

$(VENV)/.deps: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel ninja
	$(PIP) install -q torch==2.14.1
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(BUILD_LOCK) $(PIP) install -q --no-build-isolation -e ".[test,bench]"
	touch $@

setup: $(VENV)/.built

# Rebuild the extension in place (incremental with ninja) after editing csrc/.
ext: $(VENV)/.deps
	$(BUILD_LOCK) $(PY) setup.py -q build_ext --inplace
	touch $(VENV)/.built

test: setup
	$(PY) -m pytest -q -m "not triton" tests
	$(MAKE) --no-print-directory test-triton

# Triton tests run in their own process: TRITON_INTERPRET must be set before triton is imported.
test-triton: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m triton tests; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]

bench: setup
	$(VENV)/bin/hrnet-fast bench

clean:
	rm -rf build *.egg-info hrnet_fast/_C*.so $(VENV)/.built
