"""The vllm engine without vLLM: its pure helpers, the shard command, and every way a child can fail.

The children here are real processes (this interpreter, or small scripts standing in for one); the
tests that run vLLM itself are in tests/integration/test_vllm_engine.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from sao_core import storage
from sao_core.config import EngineConfig, build_config, config_to_dict, load_config
from sao_core.engines import ChatRequest, Sampling, make_engine
from sao_core.engines.child import interpreter
from sao_core.engines.vllm import llm_kwargs, request_seed, sampling_kwargs, to_completion
from sao_core.errors import ConfigError, EngineError, StorageError
from sao_core.stages.child import config_overrides
from sao_core.stages.layout import prepare_round, shard_target
from sao_core.stages.round import run_personas
from sao_core.stages.runner import EngineProvider, run_shard

REPO = Path(__file__).resolve().parents[2]


def test_llm_kwargs_on_cpu_force_float32_and_eager_mode() -> None:
    engine = EngineConfig(name="vllm", max_model_len=512)
    kwargs = llm_kwargs(engine, "/models/m", seed=7, on_cpu=True)
    assert kwargs["dtype"] == "float32"
    assert kwargs["enforce_eager"] is True
    assert kwargs["max_model_len"] == 512
    assert kwargs["seed"] == 7
    assert "revision" not in kwargs


def test_llm_kwargs_on_gpu_come_from_the_engine_section(tmp_path: Path) -> None:
    engine = EngineConfig(
        name="vllm", dtype="bfloat16", gpu_memory_utilization=0.5, tensor_parallel_size=2, enforce_eager=False
    )
    kwargs = llm_kwargs(engine, "org/model", seed=0, on_cpu=False, revision="abc123")
    assert kwargs["dtype"] == "bfloat16"
    assert kwargs["enforce_eager"] is False
    assert kwargs["gpu_memory_utilization"] == 0.5
    assert kwargs["tensor_parallel_size"] == 2
    assert kwargs["revision"] == "abc123"  # a hub id keeps its revision
    assert "max_model_len" not in kwargs  # None: the model's own
    assert llm_kwargs(EngineConfig(name="vllm"), str(tmp_path), 0, on_cpu=False)["dtype"] == "auto"
    assert "revision" not in llm_kwargs(engine, str(tmp_path), 0, on_cpu=False, revision="abc123")


def test_sampling_kwargs_seed_each_request_by_its_id() -> None:
    sampling = Sampling(temperature=0.6, top_p=0.95, max_tokens=64, seed=3)
    a = sampling_kwargs(sampling, ChatRequest.user("p-1", "hi", n=2))
    b = sampling_kwargs(sampling, ChatRequest.user("p-2", "hi", n=2))
    assert a == {"n": 2, "temperature": 0.6, "top_p": 0.95, "max_tokens": 64, "seed": request_seed(3, "p-1")}
    assert a["seed"] != b["seed"]
    assert request_seed(3, "p-1") == request_seed(3, "p-1") != request_seed(4, "p-1")
    assert 0 <= request_seed(3, "p-1") < 2**32


@pytest.mark.parametrize("reason", ["abort", None, "tool_calls"])
def test_to_completion_refuses_unfinished_answers(reason: str | None) -> None:
    with pytest.raises(EngineError, match="finish_reason"):
        to_completion("text", reason, 3, 4, "request r1")
    assert to_completion("text", "length", 3, 4, "r").finish_reason == "length"


def test_config_overrides_turn_one_config_into_the_other() -> None:
    base = build_config({"engine": {"name": "vllm"}, "judging": {"swap": False}})
    want = build_config(
        {
            "engine": {"name": "vllm", "python": "/opt/v/bin/python", "base_urls": ["http://a/v1"]},
            "judging": {"swap": True, "temperature": 1e-6},
            "run": {"root": "s3://bucket/x y"},
        }
    )
    overrides = config_overrides(config_to_dict(base), config_to_dict(want))
    assert len(overrides) == 5
    assert build_config(config_to_dict(base), overrides) == want
    assert config_overrides(config_to_dict(want), config_to_dict(want)) == []


def test_interpreter_defaults_to_this_one_and_names_a_missing_one() -> None:
    assert interpreter(EngineConfig(name="vllm")) == sys.executable
    with pytest.raises(ConfigError, match=r"engine.python .*setup_vllm_env.sh"):
        interpreter(EngineConfig(name="vllm", python="/nonexistent/bin/python"))


# --- shard children -----------------------------------------------------------------------------------


def _round(tmp_path: Path, *overrides: str) -> tuple:
    cfg = load_config(
        str(REPO / "configs" / "tiny.yaml"),
        [f"run.root={tmp_path / 'art'}", "personas.n=4", "run.shard_size=2", "engine.name=vllm", *overrides],
    )
    round_dir = prepare_round(cfg)
    run_personas(cfg, round_dir)
    return cfg, round_dir


def _script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return str(path)


def _no_shard_written(round_dir: str, index: int) -> bool:
    out = storage.join(round_dir, "prompts", "_candidates")
    return storage.read_shard_manifest(out, index) is None and not storage.exists(
        storage.join(out, storage.shard_name(index, "jsonl"))
    )


def test_child_exit_code_fails_the_shard_with_its_last_log_lines(tmp_path: Path) -> None:
    python = _script(tmp_path, "crash.sh", 'for i in $(seq 1 60); do echo "log line $i"; done\nexit 3\n')
    cfg, round_dir = _round(tmp_path, f"engine.python={python}")
    with pytest.raises(EngineError) as info:
        run_shard("prompts", cfg, round_dir, 0, EngineProvider(cfg))
    message = str(info.value)
    assert "prompts shard 0" in message and "exited with code 3" in message
    assert "log line 60" in message and "log line 21" in message and "log line 20\n" not in message
    assert _no_shard_written(round_dir, 0)


def test_child_killed_like_an_oom_names_the_signal(tmp_path: Path) -> None:
    python = _script(tmp_path, "oom.sh", 'echo "allocating"\nkill -9 $$\n')
    cfg, round_dir = _round(tmp_path, f"engine.python={python}")
    with pytest.raises(EngineError, match=r"(?s)killed by SIGKILL \(killed: out of memory\?\).*allocating"):
        run_shard("prompts", cfg, round_dir, 1, EngineProvider(cfg))
    assert _no_shard_written(round_dir, 1)


def test_child_that_writes_nothing_does_not_count_as_done(tmp_path: Path) -> None:
    python = _script(tmp_path, "lazy.sh", "echo done\nexit 0\n")
    cfg, round_dir = _round(tmp_path, f"engine.python={python}")
    with pytest.raises(EngineError, match="left no shard that verifies"):
        run_shard("prompts", cfg, round_dir, 0, EngineProvider(cfg))


def test_child_without_vllm_fails_with_the_import_error(tmp_path: Path) -> None:
    # This interpreter has no vllm: the real child command starts, then fails where vLLM is imported.
    cfg, round_dir = _round(tmp_path)
    with pytest.raises(EngineError, match=r"(?s)exited with code 1.*No module named 'vllm'"):
        run_shard("prompts", cfg, round_dir, 0, EngineProvider(cfg))
    assert _no_shard_written(round_dir, 0)


def test_child_receives_the_callers_config_changes(tmp_path: Path) -> None:
    record = tmp_path / "argv.txt"
    python = _script(tmp_path, "record.sh", f'echo "$@" > {record}\nexit 5\n')
    _, round_dir = _round(tmp_path)
    changed = load_config(
        str(REPO / "configs" / "tiny.yaml"),
        [
            f"run.root={tmp_path / 'art'}",
            "personas.n=4",
            "run.shard_size=2",
            "engine.name=vllm",
            f"engine.python={python}",
            "engine.max_model_len=256",
        ],
    )
    with pytest.raises(EngineError, match="code 5"):
        run_shard("prompts", changed, round_dir, 0, EngineProvider(changed))
    argv = record.read_text().split()
    assert argv[:2] == ["-m", "sao_core.stages.prompts"]
    assert argv[argv.index("--config") + 1] == storage.join(round_dir, "resolved_config.yaml")
    assert (Path(argv[argv.index("--model-dir") + 1]) / "config.json").is_file()  # resolved by the parent
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    assert sorted(sets) == sorted([f'engine.python="{python}"', "engine.max_model_len=256"])


def test_round_folder_must_be_visible_to_the_child(tmp_path: Path) -> None:
    cfg = load_config(
        str(REPO / "configs" / "tiny.yaml"),
        ["engine.name=vllm", "run.root=memory://vllm-test", "personas.n=2"],
    )
    in_memory = prepare_round(cfg)
    run_personas(cfg, in_memory)
    with pytest.raises(StorageError, match="cannot see memory://"):
        run_shard("prompts", cfg, in_memory, 0, EngineProvider(cfg))
    cfg, round_dir = _round(tmp_path)
    storage.remove(storage.join(round_dir, "resolved_config.yaml"))
    with pytest.raises(StorageError, match=r"resolved_config\.yaml is missing"):
        run_shard("prompts", cfg, round_dir, 0, EngineProvider(cfg))


def test_vllm_engine_worker_start_failure_is_an_engine_error(tmp_path: Path) -> None:
    from sao_core.config import ModelConfig

    start = time.perf_counter()
    with pytest.raises(EngineError, match="No module named 'vllm'"):
        make_engine(EngineConfig(name="vllm"), ModelConfig(path="bundled:tiny-random-llama"))
    assert time.perf_counter() - start < 60


# --- the shard command by hand, with another engine ---------------------------------------------------


def _stage_command(stage: str, round_dir: str, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("SAO_STAGE_CHILD", None)
    return subprocess.run(
        [sys.executable, "-m", f"sao_core.stages.{stage}", "--round", round_dir, *extra],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )  # fmt: skip


def test_shard_command_runs_by_hand_with_the_fake_engine(tmp_path: Path) -> None:
    cfg, round_dir = _round(tmp_path, "engine.name=fake")
    done = _stage_command("prompts", round_dir, "--shard", "1")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["stage"] == "prompts" and summary["shard"] == 1 and summary["rows_in"] == 2
    target = shard_target("prompts", cfg, round_dir, 1)
    entry = storage.shard_is_done(target.out_url, 1, target.input_sha256, target.settings_hash)
    assert entry is not None and entry.engine == "fake"
    again = _stage_command("prompts", round_dir, "--shard", "1", "-q")
    assert again.returncode == 0 and json.loads(again.stdout.strip().splitlines()[-1]) == summary
    resolved = yaml.safe_load(storage.read_text(storage.join(round_dir, "resolved_config.yaml")))
    assert resolved["engine"]["name"] == "fake"


def test_shard_command_names_a_bad_shard_and_bad_arguments(tmp_path: Path) -> None:
    _, round_dir = _round(tmp_path, "engine.name=fake")
    missing = _stage_command("responses", round_dir, "--shard", "0")
    assert missing.returncode == 1
    assert "error:" in missing.stderr and "not finished" in missing.stderr
    bad = _stage_command("judgements", round_dir)
    assert bad.returncode == 2 and "--shard" in bad.stderr
