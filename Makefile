# The two commands of the README: `make run` (the main job) and `make test` (lint, types, tests).
# Both build the environment first when it is missing or pyproject.toml changed.
PY := .venv/bin/python
CONFIG ?= configs/cpu-smollm2.yaml
PYTEST_ARGS ?=

.PHONY: setup run test lint bench clean

setup:
	@bash scripts/bootstrap.sh

run: setup
	.venv/bin/sao synth --config $(CONFIG)

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(PY) -m bench.engine_batching

clean:
	rm -rf .venv artifacts bench/results
