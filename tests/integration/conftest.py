"""Fixtures shared by the integration tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

VLLM_VENV = Path(__file__).resolve().parents[2] / ".venv-vllm"


@pytest.fixture(scope="session")
def vllm_python() -> str:
    """The vLLM environment's interpreter; skipped when it is absent, failed if SAO_REQUIRE_VLLM=1."""
    python = Path(os.environ.get("SAO_VLLM_PYTHON", VLLM_VENV / "bin" / "python"))
    ready = python.exists() and ("SAO_VLLM_PYTHON" in os.environ or (VLLM_VENV / ".sao-stamp").is_file())
    if not ready:
        message = f"no vLLM environment at {python} (bash scripts/setup_vllm_env.sh builds it)"
        if os.environ.get("SAO_REQUIRE_VLLM") == "1":
            pytest.fail(f"SAO_REQUIRE_VLLM=1: {message}")
        pytest.skip(message)
    return str(python)
