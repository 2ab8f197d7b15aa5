# Every target creates or updates the local virtualenv itself: on a fresh machine
# `make demo` and `make test` are the only set-up commands.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test unit integration lint typecheck bench bench-local clean services-check

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: venv
	$(BIN)/python -m sqlacache demo

test: venv
	$(BIN)/python -m pytest -q tests integration

unit: venv
	$(BIN)/python -m pytest -q tests

integration: venv
	$(BIN)/python -m pytest -q integration

lint: venv
	$(BIN)/ruff check sqlacache tests integration bench examples
	$(BIN)/ruff format --check sqlacache

typecheck: venv
	$(BIN)/mypy

bench: venv
	$(BIN)/python bench/run.py

bench-local: venv
	$(BIN)/python bench/local_tier.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
