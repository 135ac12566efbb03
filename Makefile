# The two commands of the README: `make demo` and `make test`. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint bench clean-demo

setup:
	@bash scripts/setup_env.sh

## Full pipeline on the embedded offline corpus, on CPU, in minutes.
demo: setup
	$(PY) -m llm_pipeline demo --config configs/demo/pipeline.yaml

## The whole offline test suite (GPU tests skip where no GPU is present).
test: setup
	$(PY) -m ruff check src tests bench
	$(PY) -m pytest tests

lint: setup
	$(PY) -m ruff check src tests bench
	$(PY) -m ruff format --check src tests bench

bench: setup
	$(PY) bench/model_step.py

clean-demo:
	rm -rf runs/demo
