# The README's two commands, `make bench` and `make test`, do all the set-up on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CUDA_HOME, TORCH_CUDA_ARCH_LIST and HRNET_FAST_CUDA, when unset, are chosen by setup.py, which a
# plain `pip install` runs too: /usr/local/cuda when its nvcc is there, the visible GPUs, auto.
# Builds in this tree are serialised: several shells may ask at once.
BUILD_LOCK := flock $(CURDIR)/.build.lock

SOURCES := setup.py $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' 2>/dev/null)

.PHONY: setup ext test test-triton test-asan bench gpu-check clean

$(VENV)/.deps: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel ninja
	$(PIP) install -q torch==2.14.1
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(BUILD_LOCK) $(PIP) install -q --no-build-isolation -e ".[test,bench]"
	touch $@

# MMPose's and mmsegmentation's own HRNet backbones, for tests/test_mmpose.py and tests/test_mmseg.py: the
# pinned set in requirements-openmmlab.txt, with --no-deps (mmpose declares opencv-python, xtcocotools,
# chumpy, ..., mmsegmentation scipy, prettytable, ..., which the backbones never import).
$(VENV)/.openmmlab: requirements-openmmlab.txt $(VENV)/.deps
	$(PIP) install -q --no-deps -r requirements-openmmlab.txt
	touch $@

setup: $(VENV)/.built $(VENV)/.openmmlab

# Rebuild the extension in place (incremental with ninja) after editing csrc/.
ext: $(VENV)/.deps
	$(BUILD_LOCK) $(PY) setup.py -q build_ext --inplace
	touch $(VENV)/.built

test: setup
	$(PY) -m pytest -q -m "not triton" tests
	$(MAKE) --no-print-directory test-triton

# Triton tests run in their own process: TRITON_INTERPRET must be set before triton is imported.
# pytest's exit code 5 (nothing collected) fails the job: a Triton job that ran no test proves nothing.
test-triton: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m triton tests

# The tests again (`make test`'s but the Triton ones) on an AddressSanitizer and UndefinedBehaviorSanitizer
# build of the extension (tests/asan.sh, build/asan; the in-place build is untouched). Other pytest
# arguments instead: `make test-asan ASAN_ARGS="tests/test_x.py"`. CI runs it after `make test`.
test-asan: setup
	bash tests/asan.sh $(ASAN_ARGS)

bench: setup
	$(VENV)/bin/hrnet-fast bench

# On a machine with an NVIDIA GPU and a CUDA PyTorch already installed (no venv, no downloads):
# build in place against that torch, run the GPU tests, a memcheck pass and the GPU benchmark.
# `make gpu-check PYTHON=python3 GPU_OUT=dir`; results, logs and the table land in GPU_OUT.
PYTHON ?= python3
GPU_OUT ?= bench-results/gpu-check
gpu-check:
	$(PYTHON) -m hrnet_fast.bench.gpu_check --out $(GPU_OUT) $(GPU_CHECK_ARGS)

clean:
	rm -rf build *.egg-info hrnet_fast/_C*.so $(VENV)/.built
