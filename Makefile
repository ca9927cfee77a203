# `make test` and `make demo` do all the set-up on a fresh machine: a .venv with the pinned
# dependencies, the project installed (editable) with its native extensions built.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# What the editable install bakes in: the extensions, and the version from jax_ccfuser/__init__.py.
INSTALLED := CMakeLists.txt pyproject.toml jax_ccfuser/__init__.py \
	$(wildcard xla_ffi/*.* xla_ffi/*/*) $(wildcard cuda/*) $(wildcard common/*)

.PHONY: all install test test-fast test-jax-latest test-jax-0.11 demo bench gpu-wheels \
	gpu-tokamax-wheels gpu-check gpu-check-dry clean

all: install

# --no-compile: Python compiles what is imported when it is first imported; compiling every
# module of jaxlib, scipy and the rest at install took half the install (25 of 47 s on 2 cores).
$(VENV)/.deps: requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile -r requirements.lock
	touch $@

$(VENV)/.built: $(VENV)/.deps $(INSTALLED)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.built

test: install
	$(PY) -m pytest -q --durations=15 tests

# Everything but the tests marked `slow` (over ~15 s each: the multi-process runs, the soak, the
# randomized sweeps, the training runs, the README's examples); `make test` and CI run those too.
test-fast: install
	$(PY) -m pytest -q -m "not slow" tests

# Other JAX releases, each from requirements-NAME.lock in its own .venv-NAME with Python 3.12 (which
# jax 0.11 and later need): `latest`, the newest release, and `0.11`, the line between the pinned
# one and the newest. They run JAX_LINE_TESTS: the fused op (residuals and asynchronous dispatch
# too), the Flax layers, the router, the reference, all_to_all and the call contract; the CUDA
# extension is left to `make test`'s build (the same sources against another jaxlib's headers).
PYTHON_LATEST ?= $(firstword $(foreach p,python3.12 python3.13 \
	$(wildcard $(HOME)/.pyenv/versions/3.1[2-9]*/bin/python),\
	$(shell $(p) -c "import sys; assert sys.version_info >= (3, 12)" 2>/dev/null && echo $(p))))
JAX_LINE_TESTS := tests/test_fused.py tests/test_flax.py tests/test_router.py \
	tests/test_reference.py tests/test_all_to_all.py tests/test_ffi_contract.py \
	tests/test_residuals.py tests/test_async_dispatch.py

.venv-%/.deps: requirements-%.lock
	@test -n "$(PYTHON_LATEST)" || { echo ".venv-$* needs Python >= 3.12 (set PYTHON_LATEST)"; exit 1; }
	$(PYTHON_LATEST) -m venv .venv-$*
	.venv-$*/bin/python -m pip install -q --upgrade pip
	.venv-$*/bin/python -m pip install -q --no-compile -r $<
	touch $@

# A build tree per line: each compiles against its own jaxlib's FFI headers.
.venv-%/.built: .venv-%/.deps $(INSTALLED)
	.venv-$*/bin/python -m pip install -q --no-build-isolation --no-deps \
		-Ccmake.define.CCF_ENABLE_CUDA=OFF -Cbuild-dir='build/{wheel_tag}-jax-$*' -e .
	touch $@

# Not intermediate files: a line's venv stays set up between runs.
.PRECIOUS: .venv-%/.deps .venv-%/.built

test-jax-latest test-jax-0.11: test-jax-%: .venv-%/.built
	.venv-$*/bin/python -m pytest -q -m "not slow" $(JAX_LINE_TESTS)

demo: install
	$(PY) -m models.demo

bench: install
	$(PY) -m bench.run

# The lent GPU machine has Python 3.12 and no package registry: the wheels the build needs and it
# lacks travel in .whl/ (requirements.lock's pins), with the commit stamp its report names (.git
# does not travel), and the CUDA extension built here for the image's Python and jax
# (.venv-gpu-image), whose nvcc minutes would come out of the lease (bench/gpu_build.sh). Run
# before each check; bench/gpu_check.sh's header has the `run` call.
pins = $(foreach p,$(1),$(shell grep -E '^$(p)==' requirements.lock))
GPU_WHEELS = $(call pins,nvidia-cutlass scipy-openblas32 nanobind)
MANYLINUX = manylinux_2_34_x86_64 manylinux_2_28_x86_64 manylinux_2_27_x86_64 \
	manylinux_2_25_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64
GPU_DOWNLOAD = $(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	--implementation cp $(addprefix --platform ,$(MANYLINUX))

gpu-wheels: .venv-gpu-image/.deps
	rm -rf .whl
	$(GPU_DOWNLOAD) -d .whl $(GPU_WHEELS)
	$(PYTHON) -m bench.gpu_check stamp .whl/COMMIT
	PYTHON=$(CURDIR)/.venv-gpu-image/bin/python bash bench/gpu_build.sh

# tokamax for the GPU benchmark, in a carry of its own (requirements-gpu-tokamax.lock):
# bench/gpu_tokamax.sh's header has the `run` call, after a check on the same machine.
gpu-tokamax-wheels:
	rm -rf .whl-tokamax
	$(GPU_DOWNLOAD) -d .whl-tokamax -r requirements-gpu-tokamax.lock

# On the GPU machine: build, CUDA tests, compute-sanitizer, benchmark, results file.
gpu-check:
	bash bench/gpu_check.sh

# Its rehearsal here, on the CPU backend, in a .venv-gpu-image laid out as the GPU image is
# (requirements-gpu-image.lock: Python 3.12, jax 0.11, jax_ccfuser not installed) with the carried
# wheels, as the GPU machine will run it.
gpu-check-dry: gpu-wheels
	PYTHON=$(CURDIR)/.venv-gpu-image/bin/python CCF_GPU_CHECK_DRY=1 bash bench/gpu_check.sh

clean:
	rm -rf build $(VENV) .venv-* demo_out
