# dinoflow: `make run` (set-up + the default pipeline) and `make test` (set-up + the whole suite).
SHELL := /bin/bash
.DEFAULT_GOAL := help

# No telemetry leaves the machine.
export DO_NOT_TRACK := 1
export KEDRO_DISABLE_TELEMETRY := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export GX_ANALYTICS_ENABLED := false

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
KEDRO := $(VENV)/bin/kedro
PYTEST_ARGS ?=
# the venv's kedro, dvc and mlflow first on PATH (for recipes and the tests' subprocesses)
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: help install data run smoke test lint bench ui viz tune-dashboard clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-15s %s\n", $$1, $$2}'

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml setup.py | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@# kedro pulls kedro-telemetry in; dinoflow does not use it
	$(PY) -m pip uninstall -y -q kedro-telemetry
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install dinoflow with the dev extras

data: install  ## make sure Fashion-MNIST is available (local folder, Debian package, or download)
	@if ! $(PY) -c "from dinoflow.data.fashion_mnist import find_fashion_mnist as f; f(allow_download=False)" 2>/dev/null \
	    && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  echo "Fashion-MNIST: installing the Debian package dataset-fashion-mnist"; \
	  (apt-get install -y -qq dataset-fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) >/dev/null || true; \
	fi
	$(PY) -c "from dinoflow.data.fashion_mnist import find_fashion_mnist as f; print('Fashion-MNIST:', f())"

# make run's demo trains what fits in 23.5 minutes (the length it chooses is logged); a plain
# `kedro run` or `dvc repro` trains conf/base's fixed 10,000 steps, the same on any machine
RUN_BUDGET_MIN ?= 23.5

run: data  ## the default pipeline (curation -> pretrain -> evaluation -> registration) on conf/base, ~27 min
	$(KEDRO) run --params pretrain.train.time_budget_min=$(RUN_BUDGET_MIN)

smoke: data  ## the default pipeline on the tiny smoke profile (a few minutes)
	$(KEDRO) run --env smoke

test: install  ## the whole test suite
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install  ## ruff (and the library formatted as ruff writes it), and the import layers (import-linter contracts in pyproject.toml)
	$(VENV)/bin/ruff check src pipelines tests benchmarks experiments
	$(VENV)/bin/ruff format --check src
	$(VENV)/bin/lint-imports

bench: data  ## benchmarks -> benchmarks/results/latest.json and latest.md
	$(PY) -m benchmarks.run_all
	$(PY) -m benchmarks.bench_curation
	$(PY) -m benchmarks.bench_curation --ingest
	$(PY) -m benchmarks.bench_curation_ranks

ui: install  ## the MLflow UI on the runs: http://127.0.0.1:5000 (experiments open on their training runs)
	@# --app-name dinoflow: MLflow's server whose page starts in the model-training view
	@# (MLflow 3.17 starts in GenAI; dinoflow.mlflow_app says why)
	@$(PY) -c "from dinoflow.tracking import ui_landing_url as u; \
	  print('MLflow UI, dinoflow training runs:', u('http://127.0.0.1:5000', 'sqlite:///mlflow.db'))"
	$(VENV)/bin/mlflow ui --app-name dinoflow --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

viz: install  ## kedro-viz: the pipelines as a graph (http://127.0.0.1:4141)
	$(KEDRO) viz run --host 127.0.0.1 --port 4141 --no-browser

tune-dashboard:  ## optuna-dashboard on the tuning study (http://127.0.0.1:8080)
	$(VENV)/bin/optuna-dashboard sqlite:///data/07_model_output/tuning/optuna.db --host 127.0.0.1 --port 8080

clean:  ## remove outputs (keeps .venv, raw data and the MLflow store)
	rm -rf data/0[2-8]_*/* data/09_slurm
