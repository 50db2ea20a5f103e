# Front door. `make bench` runs the default benchmark (the stages of dvc.yaml, recorded by DVC); `make test` runs the
# import-layering contracts and the test suite.
# Each creates the virtual environment (.venv) when it is missing.
PY ?= python3
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed
export PATH := $(BIN):$(PATH)

.PHONY: bench test install lock reproduce-paper ui clean-venv

# The environment is requirements.lock (every package pinned, every file's sha256), then the suite itself, no deps.
LOCK := requirements.lock
PIP_VERSION := 25.3
LOCK_VENV ?= build/lock-venv
LOCK_TOOLS := pip==$(PIP_VERSION) pip-tools==7.6.2

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q pip==$(PIP_VERSION)
	$(BIN)/python -m pip install -q --require-hashes -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

## Re-pin requirements.lock from pyproject.toml (keeps current pins where allowed; LOCK_ARGS=--upgrade moves them all).
lock:
	test -x $(LOCK_VENV)/bin/python || $(PY) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q $(LOCK_TOOLS)
	$(LOCK_VENV)/bin/python tools/lockfile.py compile $(LOCK_ARGS)

params.yaml:
	$(BIN)/mmdd init-params --preset default

## The embedded default: every method on `shapes`, on CPU: the stale stages of dvc.yaml; prints the table at the end.
## Two persistent worker processes run the stages in-process (torch and MLflow imported once per worker).
bench: $(STAMP) params.yaml
	$(BIN)/mmdd bench -j2
	@cat results/tables/$$($(BIN)/python -c "import yaml;print(yaml.safe_load(open('params.yaml'))['preset'])")/*.md

## The full reproduction (Flickr30k + COCO, NFNet-L0 + BERT, budgets 100/200/500): needs a GPU and the network.
reproduce-paper: $(STAMP)
	$(BIN)/mmdd init-params --preset paper
	$(BIN)/mmdd bench

## MLflow UI on the project's tracking store (http://127.0.0.1:5000).
## The MLflow UI on the project's store until Ctrl-C; UI_PORT=0 picks a free port (the URL is printed).
UI_PORT ?= 5000
ui: $(STAMP)
	$(BIN)/mmdd ui --port $(UI_PORT)

## Test files run on TEST_WORKERS processes (pytest-xdist, one file per worker at a time; 0: one process). PASSIVE
## OpenMP waits: a worker's idle torch threads sleep instead of spinning on the core the other worker is using.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/lint-imports
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

clean-venv:
	rm -rf $(VENV)
