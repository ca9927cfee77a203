# `make test` and `make demo` do all the set-up on a fresh machine: a .venv with the pinned
# dependencies, the project installed (editable) with its native extensions built.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# What the editable install bakes in: the extensions, and the version from jax_ccfuser/__init__.py.
INSTALLED := CMakeLists.txt pyproject.toml jax_ccfuser/__init__.py $(wildcard xla_ffi/*) \
	$(wildcard cuda/*) $(wildcard common/*)

.PHONY: all install test test-fast demo bench gpu-wheels gpu-check clean

all: install

$(VENV)/.deps: requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	touch $@

$(VENV)/.built: $(VENV)/.deps $(INSTALLED)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.built

test: install
	$(PY) -m pytest -q tests

# Everything but the soak and multi-process tests (`slow`); `make test` and CI run those too.
test-fast: install
	$(PY) -m pytest -q -m "not slow" tests

demo: install
	$(PY) -m models.demo

bench: install
	$(PY) -m bench.run

# The lent GPU machine has Python 3.12 and no package registry: the wheels the build needs and
# it lacks travel in .whl/ (requirements.lock's pins), with the commit stamp its report names
# (.git does not travel). Run before each check; bench/gpu_check.sh's header has the `run` call.
GPU_WHEELS = $(shell grep -E '^(nvidia-cutlass|scipy-openblas32|nanobind)==' requirements.lock)
MANYLINUX = manylinux_2_34_x86_64 manylinux_2_28_x86_64 manylinux_2_27_x86_64 \
	manylinux_2_25_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64

gpu-wheels:
	rm -rf .whl
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp $(addprefix --platform ,$(MANYLINUX)) -d .whl $(GPU_WHEELS)
	$(PYTHON) -m bench.gpu_check stamp .whl/COMMIT

# On the GPU machine: build, CUDA tests, compute-sanitizer, benchmark, results file.
gpu-check:
	bash bench/gpu_check.sh

clean:
	rm -rf build $(VENV) demo_out
