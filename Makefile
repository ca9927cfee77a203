# `make test` and `make demo` do all the set-up on a fresh machine: a .venv with the pinned
# dependencies, the project installed (editable) with its native extensions built.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# What the editable install bakes in: the extensions, and the version from jax_ccfuser/__init__.py.
INSTALLED := CMakeLists.txt pyproject.toml jax_ccfuser/__init__.py $(wildcard xla_ffi/*) \
	$(wildcard cuda/*) $(wildcard common/*)

.PHONY: all install test test-fast demo bench clean

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

clean:
	rm -rf build $(VENV) demo_out
