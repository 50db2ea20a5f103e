# Front door. `make bench` runs the quick benchmark (the stages of dvc.yaml, recorded by DVC); `make test` runs the
# import-layering contracts and the test suite.
# Each creates the virtual environment (.venv) when it is missing.
PY ?= python3
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed
export PATH := $(BIN):$(PATH)

.PHONY: bench test install reproduce-paper ui clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

params.yaml:
	$(BIN)/mmdd init-params --preset quick

## The embedded default: every method on `shapes`, on CPU: the stale stages of dvc.yaml; prints the table at the end.
bench: $(STAMP) params.yaml
	$(BIN)/mmdd bench
	@cat results/tables/$$($(BIN)/python -c "import yaml;print(yaml.safe_load(open('params.yaml'))['preset'])")/*.md

## The full reproduction (Flickr30k + COCO, NFNet-L0 + BERT, budgets 100/200/500): needs a GPU and the network.
reproduce-paper: $(STAMP)
	$(BIN)/mmdd init-params --preset paper
	$(BIN)/mmdd bench

## MLflow UI on the project's tracking store (http://127.0.0.1:5000).
ui: $(STAMP)
	$(BIN)/mmdd ui

test: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

clean-venv:
	rm -rf $(VENV)
