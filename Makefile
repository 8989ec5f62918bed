# One entry point for people and CI alike. `make test` and `make demo` install everything on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test quality style demo eval-demo bench compare clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 WANDB_MODE=offline OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -p no:cacheprovider --durations=15

quality: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

style: $(STAMP)
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m cppo_trl.demo --out outputs/demo

eval-demo: $(STAMP)  # after `make demo`: cppo-eval on the demo's model, with the perturbation audit
	HF_HUB_OFFLINE=1 $(BIN)/cppo-eval --config recipes/eval/eval_tiny_cpu.yaml

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench.py --sizes tiny,small --prompts 2 --steps 3 --out outputs/bench

compare: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/compare.py --out outputs/compare

clean:
	rm -rf outputs .pytest_cache
