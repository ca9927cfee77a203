# `make test` and `make demo` do all the set-up on a fresh machine: a .venv with the pinned
# dependencies, the project installed (editable) with its native extensions built.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
NATIVE := CMakeLists.txt pyproject.toml $(wildcard xla_ffi/*) $(wildcard cuda/*)

.PHONY: all install test demo bench clean

all: install

$(VENV)/.deps: requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	touch $@

$(VENV)/.built: $(VENV)/.deps $(NATIVE)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.built

test: install
	$(PY) -m pytest -q tests

demo: install
	$(PY) -m models.demo

bench: install
	$(PY) -m bench.run

clean:
	rm -rf build $(VENV) demo_out
