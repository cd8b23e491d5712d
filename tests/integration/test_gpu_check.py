"""scripts/gpu_check.py rehearsed on CPU, so the first session lent a GPU can run it unchanged.

The same script, every step: a prompts stage of two shards on one held-open vLLM worker (vLLM's CPU
build in .venv-vllm), that worker against bare vllm.LLM on the same chats, then the model with a LoRA
adapter through a LoRA request. The tiny random Llama keeps it to three vLLM starts of 30-60 s each on
2 cores. Skipped without the vLLM environment unless SAO_REQUIRE_VLLM=1 (conftest.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import vllm_python  # noqa: F401  (a fixture)

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.tier1


def test_gpu_check_rehearses_the_whole_vllm_path_on_cpu(vllm_python: str, tmp_path: Path) -> None:  # noqa: F811
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "gpu_check.py"),
        "--allow-cpu",
        "--vllm-python", vllm_python,
        "--model", "bundled:tiny-random-llama",
        "--requests", "8",
        "--max-tokens", "8",
        "--shards", "2",
        "--deadline-s", "540",
    ]  # fmt: skip
    env = {**os.environ, "SAO_CACHE": os.environ.get("SAO_CACHE", str(tmp_path / "cache"))}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "gpu_check: OK" in done.stdout
    [line] = [x for x in done.stdout.splitlines() if x.startswith("GPU_CHECK_JSON ")]
    figures = json.loads(line.split(" ", 1)[1])
    worker = figures["held_open_worker"]
    assert (worker["shards"], worker["model_loads"], worker["rows_in"]) == (2, 1, 8), worker
    assert figures["vllm_engine"]["tokens"] > 0 and figures["vllm_bare"]["tokens"] > 0, figures
    assert figures["ratio_engine_to_bare"] > 0
    assert figures["lora"]["answers_changed"] > 0 and "+adapter:" in figures["lora"]["model_revision"]
    assert figures["device"] == "cpu" and figures["model"] == "bundled:tiny-random-llama"
