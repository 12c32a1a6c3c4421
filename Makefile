# One command for each habit. Every target installs what it needs first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export TESTCONTAINERS_RYUK_DISABLED ?= true

.PHONY: help venv host images test test-unit soak lint format demo demo-down demo-hosts bench clean

help:
	@echo "make demo       set up everything, then run the demo"
	@echo "make demo-down  stop the demo's stack and remove what its agent left"
	@echo "make demo-hosts the demo with agents on 2 hosts of their own (HOSTS=N for N)"
	@echo "make test       set up everything, then run the test suite (all but the soak tests)"
	@echo "make test-unit  unit tests only (no services)"
	@echo "make soak       the long soak tests the default run leaves out (minutes each)"
	@echo "make lint       ruff (lint and format check), mypy and the import contracts"
	@echo "make format     rewrite the code with ruff format"
	@echo "make bench      run the benchmarks"
	@echo "make images     build the images (skipped when up to date)"

venv: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

host:
	bash compose/setup-host.sh

images: venv host
	$(BIN)/python compose/images/build.py

test: images
	$(BIN)/pytest

test-unit: venv
	$(BIN)/pytest -m unit tests/unit

soak: images
	$(BIN)/pytest -m soak

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-logo

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

demo: images
	bash compose/demo.sh

demo-down:
	bash compose/demo.sh down

demo-hosts: images
	bash compose/demo-hosts.sh $(HOSTS)

bench: images
	@for b in bench/[a-z]*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache .import_linter_cache
