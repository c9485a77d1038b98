# The two commands a new user needs are `make run` and `make test`; everything else is for development.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 8081
ARGS ?=

export PYTHONPATH := $(CURDIR)/layers/telematics:$(CURDIR)

.PHONY: venv test unit functional infra lint typecheck emulator run bench soak clean

$(STAMP): requirements/dev.txt requirements/constraints.txt layers/telematics/requirements.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip==26.3
	$(BIN)/python -m pip install --quiet -r requirements/dev.txt -c requirements/constraints.txt
	@touch $(STAMP)

venv: $(STAMP)

## make test: lint, type-check, then every test suite.
test: $(STAMP) lint typecheck
	$(BIN)/python -m pytest -q

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

functional: $(STAMP)
	$(BIN)/python -m pytest -q tests/functional

infra: $(STAMP)
	$(BIN)/python -m pytest -q tests/infrastructure

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

## make emulator: the User Service emulator on 127.0.0.1:$(PORT).
emulator: $(STAMP)
	PORT=$(PORT) $(BIN)/python -m local.emulator

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
