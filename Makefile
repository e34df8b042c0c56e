# qtool — set-up and the jobs a user or CI runs. Every target installs what it needs first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL ?= ../shared/assets/models/smollm2-135m-instruct-q4_1-gguf
# The demo's budget keeps it under 10 minutes on 2 CPU cores (measured in README.md):
# 32 calibration windows of 512 tokens, 8 evaluation windows of 2048 tokens.
DEMO_ARGS ?= --set calibration.n_samples=32 --set evaluate.max_tokens=16384

.PHONY: install demo test test-slow bench lint schema-docs clean

install: $(VENV)/.installed

# torch is installed first and pinned to the CPU build: an unpinned torch pulls gigabytes of CUDA packages.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[eval,dev]"
	touch $@

demo: install
	$(BIN)/qtool quantize --recipe recipes/w4a16-gptq.yaml --model $(MODEL) --run-dir runs/demo $(DEMO_ARGS)

test: install
	$(BIN)/python -m pytest -q tests

test-slow: install
	$(BIN)/python -m pytest -q -m slow tests

bench: install
	$(BIN)/python bench/run.py --model $(MODEL) --out bench/results.json

lint: install
	$(BIN)/ruff check qtool tests bench

schema-docs: install
	$(BIN)/python -m qtool.docs_gen docs/recipes.md

clean:
	rm -rf runs/demo bench/out
