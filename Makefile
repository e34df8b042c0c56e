# qtool — set-up and the jobs a user or CI runs. Every target installs what it needs first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL ?= ../shared/assets/models/smollm2-135m-instruct-q4_1-gguf
# The demo's budget keeps it under 10 minutes on 2 CPU cores (measured in README.md):
# 32 calibration windows of 512 tokens, 8 evaluation windows of 2048 tokens.
DEMO_ARGS ?= --set calibration.n_samples=32 --set evaluate.max_tokens=16384

.PHONY: install demo test test-slow bench regress lint schema-docs clean

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

# Perplexity regression gate (run by CI): quantize stories260K with the W4A16-GPTQ test recipe and compare with the
# committed baseline. Add each new recipe here as it lands. Re-baseline deliberately with REGRESS_ARGS=--update.
REGRESS_RUN := runs/ci-stories260k-w4a16-gptq
regress: install
	$(BIN)/qtool quantize --recipe configs/tests/stories260k-w4a16-gptq.yaml --run-dir $(REGRESS_RUN) --force
	$(BIN)/qtool regress --baseline configs/baselines/stories260k-w4a16-gptq.json \
		--results $(REGRESS_RUN)/06-evaluate/results.json --recipe configs/tests/stories260k-w4a16-gptq.yaml $(REGRESS_ARGS)

lint: install
	$(BIN)/ruff check qtool tests bench
	$(BIN)/ruff format --check .

schema-docs: install
	$(BIN)/python -m qtool.docs_gen docs/recipes.md

clean:
	rm -rf runs/demo bench/out
