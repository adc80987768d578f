# Two entry points, each one command from a fresh clone: `make run` and `make test`.
# Each creates its own virtualenv in .venv (override with VENV=...).
PYTHON ?= python3
VENV ?= .venv
# A machine that already has torch keeps it; otherwise this one is installed (a CPU wheel where the
# package index offers one). Any torch >= 2.4 works.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.flexrun-installed

.PHONY: install run test lint

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/flexrun config facebook/opt-175b
	$(BIN)/flexrun bench --model opt-125m --dummy-weights --dtype float32 --weights disk=100 --prompt-len 64 --gen-len 16 --gpu-batch-size 8 --num-gpu-batches 2

lint: install
	$(BIN)/ruff check flexrun tests
	$(BIN)/ruff format --check flexrun tests
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q
