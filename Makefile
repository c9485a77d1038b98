# The two commands a new user needs are `make run` and `make test`; everything else is for development.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 8081
ARGS ?=

export PYTHONPATH := $(CURDIR)/layers/telematics:$(CURDIR)

.PHONY: venv test unit functional infra fuzz lint typecheck scan emulator run bench soak clean

$(STAMP): requirements/dev.txt requirements/constraints.txt layers/telematics/requirements.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip==26.3
	$(BIN)/python -m pip install --quiet -r requirements/dev.txt -c requirements/constraints.txt
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/python -m pip install --quiet --no-deps -e .
	@touch $(STAMP)

venv: $(STAMP)

SCAN_VENV := .venv-scan
SCAN_STAMP := $(SCAN_VENV)/.installed

$(SCAN_STAMP): requirements/scan.txt requirements/scan-constraints.txt
	@test -x $(SCAN_VENV)/bin/python || $(PYTHON) -m venv $(SCAN_VENV)
	$(SCAN_VENV)/bin/python -m pip install --quiet -r requirements/scan.txt -c requirements/scan-constraints.txt
	@touch $(SCAN_STAMP)

## make test: lint, type-check, scan the template, then every test suite.
test: $(STAMP) lint typecheck scan
	$(BIN)/python -m pytest -q

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

functional: $(STAMP)
	$(BIN)/python -m pytest -q tests/functional

infra: $(STAMP)
	$(BIN)/python -m pytest -q tests/infrastructure

## make fuzz: the property-based tests with a large budget (FUZZ_EXAMPLES per property, default 2000); failing
## inputs are saved to tests/fuzz/examples and the figures recorded in bench/RESULTS.md.
fuzz: $(STAMP)
	$(BIN)/python bench/fuzz.py $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

## make scan: checkov on template.yaml; every suppression is justified in the template beside the resource.
scan: $(SCAN_STAMP)
	$(SCAN_VENV)/bin/checkov -f template.yaml --framework cloudformation --compact --quiet --skip-download

## make run: the whole service locally (moto + emulator + handlers in-process) fed a demo workload, then a
## summary (exit 0 when all is as expected). ARGS=--serve keeps it running for manual use; ARGS=--help lists options.
run: $(STAMP)
	$(BIN)/python -m local.demo $(ARGS)

## make soak: the load and fault soak of the whole service on the local stack (ARGS=--help for sizes).
soak: $(STAMP)
	$(BIN)/python bench/soak.py $(ARGS)

## make emulator: the User Service emulator on 127.0.0.1:$(PORT).
emulator: $(STAMP)
	PORT=$(PORT) $(BIN)/python -m local.emulator

clean:
	rm -rf $(VENV) $(SCAN_VENV) .pytest_cache .mypy_cache .ruff_cache
