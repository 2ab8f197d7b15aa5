# Every target creates or updates the local virtualenv itself: on a fresh machine
# `make demo` and `make test` are the only set-up commands.
# `make demo` installs only the package (SQLAlchemy, cashews): the demo runs on mem:// and the
# standard library's sqlite3. The other targets install the dev toolchain on top (a second stamp).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
BASE := $(BIN)/python
DEMO_STAMP := $(VENV)/.installed-demo
STAMP := $(VENV)/.installed

.PHONY: venv demo test unit integration lint typecheck bench bench-local wheel-check field soak clean

venv: $(STAMP)

$(BASE):
	$(PYTHON) -m venv $(VENV)

$(DEMO_STAMP): pyproject.toml | $(BASE)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e .
	touch $(DEMO_STAMP)

$(STAMP): pyproject.toml | $(BASE)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP) $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/python -m sqlacache demo

test: venv
	$(BIN)/python -m pytest -q tests integration

soak: venv
	$(BIN)/python -m pytest -q -s integration/test_soak.py

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

# Build the wheel and install it into bare virtualenvs (without and with the redis extra): the
# imports, the extras' error messages and the demo must work from the wheel alone.
wheel-check: venv
	PYTHON=$(PYTHON) .ci/wheel-check

# Real projects' own test suites without and with the cache (field/README.md); not part of `test`.
# FIELD_PG=postgresql://... adds PostgreSQL rows, FIELD_SRC="fastcrud=PATH" adds fastcrud.
field:
	$(PYTHON) field/run.py $(FIELD_ARGS)

bench-local: venv
	$(BIN)/python bench/local_tier.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info
