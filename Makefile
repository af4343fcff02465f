# BFN on Ray. `make help` lists the targets.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help install test test-faults test-fast test-multinode run bench lint mlflow-ui clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[pipeline,dev]"
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install everything (torch 2.13.0 CPU first)

CHROMIUM := /usr/bin/chromium

$(CHROMIUM):  ## headless browser for the MLflow UI test (Debian package)
	-(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1

# Five pytest processes, each under a timeout (a starved Ray hangs instead of failing): the
# cluster and fault tests start Ray runtimes of their own, and Ray Train's clean-up actor gives up
# when it finds several Ray instances on one machine.
test: $(STAMP) $(CHROMIUM)  ## run the whole test suite (what .ci/run runs); 22-27 min on 2 cores
	timeout -s INT -k 60 2700 $(BIN)/python -m pytest -q -m "not cluster and not faults and not standalone and not multinode"
	timeout -s INT -k 60 600 $(BIN)/python -m pytest -q -m standalone
	timeout -s INT -k 60 900 $(BIN)/python -m pytest -q -m cluster
	timeout -s INT -k 60 1500 $(BIN)/python -m pytest -q -m faults
	timeout -s INT -k 60 900 $(BIN)/python -m pytest -q -m multinode

test-faults: $(STAMP)  ## only the fault-injection runs (worker/driver SIGKILL, MLflow and S3 outages); ~5 min
	timeout -s INT -k 60 1500 $(BIN)/python -m pytest -q -m faults

test-multinode: $(STAMP)  ## only the multi-node tier (head + worker raylets on 127.0.0.1: node loss, preemption); ~5 min
	timeout -s INT -k 60 900 $(BIN)/python -m pytest -q -m multinode

test-fast: $(STAMP)  ## only the fast tests (no Ray, no servers)
	$(BIN)/python -m pytest -q -m "not slow"

run: $(STAMP)  ## the main job: ~10 min binarized-MNIST BFN on a local 2-worker Ray, tracked in local MLflow
	$(BIN)/bfn data prepare mnist
	timeout -s INT -k 60 3600 $(BIN)/bfn train experiment=mnist_local

bench: $(STAMP)  ## benchmarks: training step vs bare network, Ray loop vs plain loop
	$(BIN)/bfn bench

lint: $(STAMP)  ## ruff (format and lint) and the layer contracts (import-linter, pyproject.toml)
	$(BIN)/ruff format --check bfn pipeline tune_spaces tests
	$(BIN)/ruff check bfn pipeline tune_spaces tests
	$(BIN)/lint-imports

mlflow-ui: $(STAMP)  ## browse the local MLflow store
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/runs/mlflow.db --host 127.0.0.1 --port 5000

clean:  ## remove the venv and run outputs
	rm -rf $(VENV) runs outputs .pytest_cache
