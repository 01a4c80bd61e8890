# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the suite).
# Both create .venv, install the pinned requirements and build eqkernels._C in place.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
export CUDA_HOME ?= /usr/local/cuda
# Two archs keep the CUDA build to minutes; CI builds SASS for sm_80 and sm_90 (see .ci/run).
export EQK_CUDA_ARCHS ?= 8.0;9.0+PTX

.PHONY: all venv build build-cpu lint test test-fast bench demo clean gpu-check

all: test

.venv/.installed: requirements.txt setup.py pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q -r requirements.txt
	EQK_BUILD_EXT=0 $(PIP) install -q --no-deps --no-build-isolation -e .
	touch $@

venv: .venv/.installed

# Incremental (ninja): a no-op when nothing changed. CUDA sources are built when nvcc is found.
build: venv
	$(PY) setup.py -q build_ext --inplace

# The demo needs no CUDA: reuse any existing build, else build the CPU kernels only.
build-cpu: venv
	@ls eqkernels/_C*.so >/dev/null 2>&1 || EQK_BUILD_CUDA=0 $(PY) setup.py -q build_ext --inplace

lint: venv
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

test: build lint
	$(PY) -m pytest -q -ra tests

test-fast: build
	$(PY) -m pytest -q -ra -m "not slow" tests

bench: build
	$(PY) -m bench.run_all

demo: build-cpu
	$(PY) -m eqnet.cli demo

# On a GPU machine: the installed python3 and its CUDA torch, never the venv and never pip.
# Builds _C for the local GPU, runs the `gpu` tests and the GPU benchmarks into $(GPU_OUT).
PYTHON  ?= python3
GPU_OUT ?= gpu-check-results
gpu-check:
	$(PYTHON) -m bench.gpu_check $(GPU_OUT)

clean:
	rm -rf build eqkernels/_C*.so .pytest_cache
