# The two commands of README.md, and a few helpers. Each target does its own set-up.
VENV ?= .venv
GPU_VENV ?= .venv-gpu
# Jobs run `python -m modelmake`: the environment's bin comes first on PATH, as after `source .venv/bin/activate`.
export PATH := $(abspath $(VENV))/bin:$(PATH)
SNAKEMAKE = snakemake
PYTEST = python -m pytest

.PHONY: setup setup-gpu demo test test-quick lint bench clean

setup:
	@bash scripts/setup.sh

setup-gpu:  ## on a GPU cluster: .venv-gpu from envs/gpu.lock.txt (vLLM's CUDA build, training stack, SLURM plugin)
	@VENV=$(GPU_VENV) bash scripts/setup.sh --gpu

demo: setup  ## run the embedded default (config.yaml) end to end on the CPU
	$(SNAKEMAKE) --cores all

test: setup  ## every test, the slow ones (real vLLM servers, the demo workflow) included
	$(PYTEST) tests

test-quick: setup  ## unit and dry-run tests only (seconds)
	$(PYTEST) tests -m "not slow"

lint: setup
	$(SNAKEMAKE) --lint

bench: setup
	python bench/bench_dag.py
	python bench/bench_serving.py
	$(SNAKEMAKE) --cores all results/router/demo/data/train.parquet results/assets/models/tiny-llama
	python bench/bench_router.py
	python bench/bench_train.py

clean:
	rm -rf results .snakemake
