# retnet-train: `make train` and `make test` are all a newcomer needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DATA_DIR ?= data/sample
# CPU torch unless a GPU is visible; CI pins the CPU build that lies on disk.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
STAMP := $(VENV)/.installed

.PHONY: help setup data train test test-gpu clean-data

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	# deepspeed ships as an sdist whose build imports torch: build it against the torch above.
	$(PIP) install -q setuptools wheel ninja packaging
	DS_BUILD_OPS=0 $(PIP) install -q --no-build-isolation "deepspeed>=0.15"
	$(PIP) install -q -e ".[dev,eval]"
	# torchscale (reference RetNet, tests only) depends on timm -> torchvision -> CUDA torch: skip its deps.
	$(PIP) install -q --no-deps torchscale==0.3.0 fairscale==0.4.13
	@touch $(STAMP)

setup: $(STAMP)  ## create .venv and install the project (editable, dev extras)

data: $(STAMP)  ## build the embedded sample corpus, tokenizer and shards into data/sample (DATA_DIR=...)
	$(PY) -m data_prep.sample_corpus --out $(DATA_DIR)

train: data  ## train a tiny RetNet on CPU on the sample corpus (resumes if run again; TRAIN_ARGS=overrides)
	$(PY) -m retnet_train.train experiment=tiny_cpu "data.paths=[$(DATA_DIR)/shards]" data.tokenizer=$(DATA_DIR)/tokenizer.model $(TRAIN_ARGS)

test: $(STAMP)  ## lint (ruff) and run the CPU test suite
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q

test-gpu: $(STAMP)  ## run the GPU tests (needs CUDA/ROCm and the gpu extra)
	$(PY) -m pytest -q -m gpu

clean-data:  ## remove the built sample data
	rm -rf $(DATA_DIR)
