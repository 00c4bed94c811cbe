# ByteLeap agents: the two README commands (`make demo`, `make test`) set themselves up from nothing.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: help setup test lint typecheck unit demo bench clean distclean

help:
	@echo "make demo   - the one-box devnet: chain, validator, 2 miners, 5 workers, 4 rounds, weights"
	@echo "make test   - ruff, mypy and the whole pytest suite"
	@echo "make bench  - benchmarks under tests/perf, JSON written to build/bench.json"

# System packages come from bin/dev-deps (idempotent; a no-op when all are present).
$(STAMP): pyproject.toml bin/dev-deps
	bin/dev-deps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check agents tests bin ansible
	$(VENV)/bin/ruff format --check agents tests bin ansible
	$(VENV)/bin/ruff check --target-version py310 bin/vfio-setup
	$(VENV)/bin/ruff format --check bin/vfio-setup
	cd ansible && PATH="$(CURDIR)/$(VENV)/bin:$$PATH" ../$(VENV)/bin/ansible-lint

# The nspawn connection plugin is checked from inside ansible/: at the top the directory would
# shadow the ansible package for mypy.
typecheck: $(STAMP)
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy --strict --python-version 3.10 bin/vfio-setup
	$(VENV)/bin/mypy ansible/molecule/default/devnet_chain.py ansible/molecule/default/nspawn_container.py tests/system/test_ansible.py
	cd ansible && ../$(VENV)/bin/mypy --strict --ignore-missing-imports plugins/connection/nspawn.py

unit: $(STAMP)
	$(VENV)/bin/pytest tests/unit -q

test: lint typecheck
	bin/ensure-postgres
	$(VENV)/bin/pytest -q

demo: $(STAMP)
	$(VENV)/bin/byteleapctl devnet up --miners 2 --workers 5 --cheaters 1 --flaky 1 --rounds 4

bench: $(STAMP)
	@mkdir -p build
	$(PY) -m tests.perf.run --out build/bench.json

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find agents tests -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)

# Debian packages and their flat apt repository in build/debs (docs/packaging.md); root only.
.PHONY: debs
debs:
	bin/build-debs build/debs
