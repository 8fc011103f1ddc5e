# histoseg: `make train` and `make test` bootstrap everything (venv + install) on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
STAMP := $(VENV)/.histoseg-installed
ARGS ?=
PYTEST_ARGS ?=

.DEFAULT_GOAL := help

help: ## show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-12s %s\n", $$1, $$2}'

# pip byte-compiles the venv as it installs (about 65 s of the 145 s on 2 cores). Keep it: where
# PYTHONDONTWRITEBYTECODE=1 is set (as on the CI machines) nothing compiled later is cached, and `--no-compile`
# made every test process recompile its imports (suite 560 s instead of 430 s).
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP) ## create .venv if missing and install histoseg with dev extras (torch pinned by constraints.txt)

train: $(STAMP) ## train the embedded synthetic default (about 5 min on 2 CPU cores); ARGS="..." adds overrides
	$(PY) train.py experiment=synthetic_quick $(ARGS)

# the suite in parallel: one pytest-xdist worker per core (at most 4; each worker gets cores / workers torch
# threads, see tests/conftest.py); tests sharing a module fixture stay on one worker (xdist_group + loadgroup).
# TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= auto
XDIST := -n $(TEST_WORKERS) --maxprocesses 4 --dist loadgroup

test: $(STAMP) ## run the whole test suite (what CI runs; real-data tests read the data kit in place)
	$(PY) -m pytest -q $(XDIST) $(PYTEST_ARGS)

test-fast: $(STAMP) ## the suite without tests marked slow (for development; CI runs them all)
	$(PY) -m pytest -q $(XDIST) -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP) ## run the benchmarks and write benchmarks/results/<host>.json
	$(PY) -m benchmarks.run $(ARGS)

results: $(STAMP) ## regenerate the results tables (README.md, experiments/*/README.md) from experiments/*/results.json
	$(PY) experiments/make_table.py

format: $(STAMP) ## ruff format + fix
	$(PY) -m ruff check --fix histoseg tests benchmarks train.py
	$(PY) -m ruff format histoseg tests benchmarks train.py

lint: $(STAMP) ## ruff check
	$(PY) -m ruff check histoseg tests benchmarks train.py

clean: ## remove logs and caches (keeps .venv)
	rm -rf logs outputs multirun .cache .pytest_cache

.PHONY: help install train test test-fast bench results format lint clean
