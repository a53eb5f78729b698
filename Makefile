# Two entry points (see README): `make demo` runs the main job, `make test` the tests.
# Each builds the virtual environment it needs on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast venv clean

venv: $(STAMP)

# the same pins as every cluster node (cluster/constraints.txt, checked by tests/test_cluster_pins.py)
$(STAMP): pyproject.toml cluster/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c cluster/constraints.txt -e '.[dev,crf]'
	touch $@

demo: $(STAMP)
	$(BIN)/weakseg search search_spaces/demo.yaml --restart

test: $(STAMP)
	@bash scripts/ensure_chromium.sh
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf $(VENV) data runs results/ray results/mlflow.db results/mlartifacts
