# One entry point for people and CI alike. `make test` and `make demo` install everything on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-engines quality style demo eval-demo bench compare agents gpu-wheels gpu-check clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

TEST_ENV := HF_HUB_OFFLINE=1 WANDB_MODE=offline OMP_NUM_THREADS=1
test: $(STAMP)
	$(TEST_ENV) $(BIN)/python -m pytest -q -p no:cacheprovider --durations=15

# The real engines, on CPU (docs/gpu.md, "What runs where"): DeepSpeed ZeRO-3/ZeRO-2 on 2 processes with the
# [deepspeed] extra; real vLLM (its CPU build) in its own venv; the main suite again on the [gpu] install's versions.
VENV_VLLM := .venv-vllm
DS_STAMP := $(VENV)/.deepspeed
VLLM_STAMP := $(VENV_VLLM)/.installed
$(DS_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[dev,deepspeed]"
	touch $@
$(VLLM_STAMP): tests/vllm_cpu/setup.sh tests/vllm_cpu/requirements.txt pyproject.toml
	bash tests/vllm_cpu/setup.sh $(VENV_VLLM)
	touch $@
test-engines: $(DS_STAMP) $(VLLM_STAMP)
	$(TEST_ENV) DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR=$(abspath $(VENV))/torch_extensions \
		$(BIN)/python -m pytest -q -p no:cacheprovider -m engines tests/test_deepspeed.py
	$(TEST_ENV) VLLM_CPU_KVCACHE_SPACE=1 $(VENV_VLLM)/bin/python -m pytest -q -p no:cacheprovider -m engines \
		tests/test_vllm_engine.py
	$(TEST_ENV) $(VENV_VLLM)/bin/python -m pytest -q -p no:cacheprovider

quality: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

style: $(STAMP)
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m cppo_trl.scripts.demo --out outputs/demo

eval-demo: $(STAMP)  # after `make demo`: cppo-eval on the demo's model, with the perturbation audit
	HF_HUB_OFFLINE=1 $(BIN)/cppo-eval --config recipes/eval/eval_tiny_cpu.yaml

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench.py --sizes tiny,small --prompts 2 --steps 3 --two-process --out outputs/bench

compare: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/compare.py --out outputs/compare

agents: $(STAMP)  # GRPO vs PAPO vs CPPO for a VLM agent with a zoom tool, in miniature (~11 min on 2 shared CPU cores)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/agents.py --out outputs/agents

# Wheels of every dependency except torch, for an offline GPU machine with Python $(GPU_PYVER) (README "GPU").
# TORCHVISION=none when that machine already has torchvision, or the version built for its torch.
WHEELS ?= wheels/gpu
GPU_PYVER ?= 3.12
TORCHVISION ?=
gpu-wheels: $(STAMP)
	$(BIN)/python benchmarks/gpu_wheels.py --out $(WHEELS) --python-version $(GPU_PYVER) $(if $(TORCHVISION),--torchvision $(TORCHVISION))

# On the GPU machine, in the environment that has torch (no .venv, no network):
#   pip install --no-index --find-links wheels/gpu -e . && make gpu-check
GPU_PYTHON ?= python
gpu-check:
	HF_HUB_OFFLINE=1 $(GPU_PYTHON) benchmarks/gpu_check.py --out outputs/gpu_check

clean:
	rm -rf outputs .pytest_cache
