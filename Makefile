# The two commands a new user needs are `make run` and `make test`; everything else is for development.
SHELL := /bin/bash
comma := ,
# The Lambda runtime's Python (template.yaml's Runtime): the tests, lint, type-check, `sam build` and the check of
# the built artifact all run on it.
RUNTIME_PYTHON := 3.12
RUNTIME_VERSION_CHECK := import sys; sys.exit(sys.version_info[:2] != ($(subst .,$(comma),$(RUNTIME_PYTHON))))
# PYTHON=/path/to/python3.12 picks the interpreter; otherwise the first candidate that really runs $(RUNTIME_PYTHON)
# (a pyenv shim whose version is not selected fails that check and is passed over).
PYTHON_CANDIDATES := python$(RUNTIME_PYTHON) \
	$(wildcard $(PYENV_ROOT)/versions/$(RUNTIME_PYTHON).*/bin/python$(RUNTIME_PYTHON)) \
	$(wildcard $(HOME)/.pyenv/versions/$(RUNTIME_PYTHON).*/bin/python$(RUNTIME_PYTHON)) \
	$(wildcard /usr/local/bin/python$(RUNTIME_PYTHON) /usr/bin/python$(RUNTIME_PYTHON))
ifeq ($(origin PYTHON),undefined)
PYTHON := $(firstword $(foreach candidate,$(PYTHON_CANDIDATES),\
	$(shell $(candidate) -c '$(RUNTIME_VERSION_CHECK)' >/dev/null 2>&1 && command -v $(candidate))))
endif
CHECK_PYTHON := test -n "$(PYTHON)" && $(PYTHON) -c '$(RUNTIME_VERSION_CHECK)' 2>/dev/null || { \
	echo "error: Python $(RUNTIME_PYTHON) (the Lambda runtime's version) is needed and was not found$(if $(PYTHON), at PYTHON=$(PYTHON))." >&2; \
	echo "       Install it (e.g. pyenv install $(RUNTIME_PYTHON)), or run make PYTHON=/path/to/python$(RUNTIME_PYTHON) ..." >&2; exit 1; }
# Where that interpreter lives: put first on PATH for `sam build`, which looks for python$(RUNTIME_PYTHON) there.
PYTHON_DIR = $(dir $(shell command -v $(PYTHON)))
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 8081
ARGS ?=

export PYTHONPATH := $(CURDIR)/layers/telematics:$(CURDIR)

.PHONY: venv test unit functional infra fuzz artifact lint typecheck scan validate build lock cold-start memory \
	emulator run bench soak clean

$(STAMP): requirements/dev.txt requirements/constraints.txt layers/telematics/requirements.txt pyproject.toml
	@$(CHECK_PYTHON)
	@# A virtual environment of another Python (an older checkout's) is made anew.
	@$(BIN)/python -c '$(RUNTIME_VERSION_CHECK)' 2>/dev/null || { rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install --quiet --upgrade pip==26.3
	@# The layer's lock first, hash-checked: the tests run exactly the distributions `sam build` ships.
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r layers/telematics/requirements.txt
	$(BIN)/python -m pip install --quiet -r requirements/dev.txt -c requirements/constraints.txt
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/python -m pip install --quiet --no-deps -e .
	@touch $(STAMP)

venv: $(STAMP)

SCAN_VENV := .venv-scan
SCAN_STAMP := $(SCAN_VENV)/.installed

$(SCAN_STAMP): requirements/scan.txt requirements/scan-constraints.txt
	@$(CHECK_PYTHON)
	@$(SCAN_VENV)/bin/python -c '$(RUNTIME_VERSION_CHECK)' 2>/dev/null || { rm -rf $(SCAN_VENV) && $(PYTHON) -m venv $(SCAN_VENV); }
	$(SCAN_VENV)/bin/python -m pip install --quiet -r requirements/scan.txt -c requirements/scan-constraints.txt
	@touch $(SCAN_STAMP)

DEPLOY_VENV := .venv-deploy
DEPLOY_STAMP := $(DEPLOY_VENV)/.installed

$(DEPLOY_STAMP): requirements/deploy.txt requirements/deploy-constraints.txt
	@$(CHECK_PYTHON)
	@$(DEPLOY_VENV)/bin/python -c '$(RUNTIME_VERSION_CHECK)' 2>/dev/null || { rm -rf $(DEPLOY_VENV) && $(PYTHON) -m venv $(DEPLOY_VENV); }
	$(DEPLOY_VENV)/bin/python -m pip install --quiet -r requirements/deploy.txt -c requirements/deploy-constraints.txt
	@touch $(DEPLOY_STAMP)

# A fresh Python with nothing but boto3 (not even pip): the stand-in for the Lambda runtime when the built artifact
# is run and timed.
RUNTIME_VENV := .venv-runtime
RUNTIME_STAMP := $(RUNTIME_VENV)/.installed

$(RUNTIME_STAMP): requirements/runtime.txt
	@$(CHECK_PYTHON)
	rm -rf $(RUNTIME_VENV) && $(PYTHON) -m venv $(RUNTIME_VENV)
	$(RUNTIME_VENV)/bin/python -m pip install --quiet --require-hashes --no-deps -r requirements/runtime.txt
	$(RUNTIME_VENV)/bin/python -m pip uninstall --quiet --yes pip
	@touch $(RUNTIME_STAMP)

SAM := SAM_CLI_TELEMETRY=0 PATH="$(PYTHON_DIR):$$PATH" $(DEPLOY_VENV)/bin/sam
BUILD_DIR := .aws-sam/build
# What the tests of the built artifact need to know (tests/infrastructure/test_layer_lock.py,
# tests/functional/test_built_artifact.py); without it they are skipped.
ARTIFACT_ENV := TELEMATICS_BUILD_DIR=$(CURDIR)/$(BUILD_DIR) TELEMATICS_RUNTIME_PYTHON=$(CURDIR)/$(RUNTIME_VENV)/bin/python

## make test: lint, type-check, scan and validate the template, build the artifact, then every test suite (the
## built artifact's included).
test: $(STAMP) lint typecheck scan validate build $(RUNTIME_STAMP)
	$(ARTIFACT_ENV) $(BIN)/python -m pytest -q

## make validate / make build: `sam validate --lint` and `sam build` (settings in samconfig.toml), with the pinned SAM CLI.
validate: $(DEPLOY_STAMP)
	$(SAM) validate --lint

build: $(DEPLOY_STAMP)
	@$(CHECK_PYTHON)
	$(SAM) build

## make artifact: only the tests of the built artifact (after make build).
artifact: $(STAMP) $(RUNTIME_STAMP)
	$(ARTIFACT_ENV) $(BIN)/python -m pytest -q tests/infrastructure/test_layer_lock.py tests/functional/test_built_artifact.py

## make cold-start: the cold-start benchmark of every function of the built artifact (bench/results/cold_start.md).
cold-start: $(STAMP) $(RUNTIME_STAMP) build
	$(ARTIFACT_ENV) $(BIN)/python bench/cold_start.py $(ARGS)

## make memory: peak memory and time per realistic batch of every function of the built artifact, what each
## MemorySize is chosen from (bench/results/memory.md).
memory: $(STAMP) $(RUNTIME_STAMP) build
	$(ARTIFACT_ENV) $(BIN)/python bench/memory.py $(ARGS)

## make lock: resolve layers/telematics/requirements.in into the layer's lock (every distribution pinned, with
## hashes) and requirements/runtime.in into the runtime stand-in's, at the versions already locked where possible.
lock: $(DEPLOY_STAMP)
	$(DEPLOY_VENV)/bin/uv pip compile --quiet --generate-hashes --python-version $(RUNTIME_PYTHON) \
		--python-platform x86_64-manylinux_2_17 --custom-compile-command "make lock" \
		layers/telematics/requirements.in -o layers/telematics/requirements.txt
	$(DEPLOY_VENV)/bin/uv pip compile --quiet --generate-hashes --python-version $(RUNTIME_PYTHON) \
		--python-platform x86_64-manylinux_2_17 --custom-compile-command "make lock" \
		requirements/runtime.in -c layers/telematics/requirements.txt -o requirements/runtime.txt

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
	rm -rf $(VENV) $(SCAN_VENV) $(DEPLOY_VENV) $(RUNTIME_VENV) .aws-sam .pytest_cache .mypy_cache .ruff_cache
