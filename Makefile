# The two commands of the README: `make demo` and `make test`. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# Test tiers: `make test` skips the tests marked slow (subprocesses, 2-rank FSDP, kill -9, end-to-end
# pipelines) unless CI=true, where it runs them all; `make test-all` runs them all anywhere.
TIER := $(if $(filter true,$(CI)),,-m "not slow")

.PHONY: setup setup-base demo test test-all lint bench clean-demo

## The package with its dev extras (tests, lint, reference libraries, trackers, Ray).
setup:
	@bash scripts/setup_env.sh

## The package alone: what the demo needs (a clean clone's `make demo` skips the test-only packages).
setup-base:
	@EXTRAS= bash scripts/setup_env.sh

## Full pipeline on the embedded offline corpus, on CPU, in minutes.
demo: setup-base
	$(PY) -m llm_pipeline demo --config configs/demo/pipeline.yaml

## The fast tier (under ten minutes on 2 cores); with CI=true, every test. GPU tests skip without a GPU.
test: setup
	$(PY) -m ruff check src tests bench
	$(PY) -m pytest tests $(TIER)

## Every test, the slow tier too (subprocess, 2-rank, kill -9 and end-to-end pipeline tests).
test-all: setup
	$(PY) -m ruff check src tests bench
	$(PY) -m pytest tests

lint: setup
	$(PY) -m ruff check src tests bench
	$(PY) -m ruff format --check src tests bench

bench: setup
	$(PY) bench/model_step.py

clean-demo:
	rm -rf runs/demo
