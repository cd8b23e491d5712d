"""A round in one process on one GPU node keeps one engine alive at a time (tasks/engines.py).

The vllm engine runs the scripted worker (tests/core/scripted_vllm_worker.py) in place of vLLM: a real
child process per engine, which records the other workers still running when it starts. The data
stages' child must be gone before the trainer starts, and the evaluation's engines (the trained policy,
the current model as contender and judge) must never be alive two at once: on a GPU each would hold
`gpu_memory_utilization` of the same memory.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
WORKER = ROOT / "tests" / "core" / "scripted_vllm_worker.py"
pytestmark = pytest.mark.tier1


def _commands(log: Path, op: str) -> list[dict]:
    return [c for c in map(json.loads, log.read_text().splitlines()) if c["op"] == op]


def test_a_local_round_has_one_engine_child_alive_at_a_time(
    tmp_path: Path, prefect_api: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tasks.training as training
    from flows.sao_round import sao_round
    from tasks.engines import close_engines
    from tests.core.scripted_vllm_worker import running

    log = tmp_path / "worker-commands.jsonl"
    monkeypatch.setenv("SCRIPTED_LOG", str(log))
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nexec {sys.executable} {WORKER} "$@"\n')
    python.chmod(0o755)

    at_training: dict[str, list[int]] = {}
    train = training.train

    def train_when_alone(cfg, pairs_url, output_url):
        pids = sorted({c["pid"] for c in _commands(log, "start")})
        at_training["workers"] = pids
        at_training["alive"] = [p for p in pids if running(p)]
        return train(cfg, pairs_url, output_url)

    monkeypatch.setattr(training, "train", train_when_alone)
    overrides = [
        f"run.root={tmp_path / 'art'}",
        "engine.name=vllm",
        f"engine.python={python}",
        "engine.max_model_len=256",
        'prompts.prefill="User prompt: As a"',  # the scripted worker's questions then parse as prompts
        "evaluation.n=4",
        "evaluation.downstream.enabled=false",
    ]
    try:
        state = sao_round(TINY, overrides, return_state=True)
    finally:
        close_engines()  # the round leaves the current model's engine loaded for what comes next
    assert state.is_completed(), state

    starts = _commands(log, "start")
    # The data stages shared one child (one load for prompts, responses and judgements) ...
    data_pid = starts[0]["pid"]
    assert at_training["workers"] == [data_pid], at_training
    # ... which had exited before the trainer started.
    assert at_training["alive"] == [], at_training
    # The evaluation loaded the trained policy (a LoRA request) and the current model: two more children,
    # each started once the one before had gone.
    assert len(starts) >= 3, [s["pid"] for s in starts]
    assert [s["alive"] for s in starts] == [[]] * len(starts), [(s["pid"], s["alive"]) for s in starts]
