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

from sao_core.config import EngineConfig
from sao_core.engines import ChatRequest, Sampling, make_engine
from sao_core.engines.child import interpreter
from sao_core.engines.provider import EngineProvider
from sao_core.engines.vllm import (
    LORA_RANKS,
    llm_kwargs,
    max_lora_rank,
    request_seed,
    sampling_kwargs,
    to_completion,
)
from sao_core.errors import ConfigError, EngineError, ModelNotFoundError
from sao_core.stages.no_model import run_personas
from sao_core.stages.runner import run_model_stage, run_shard
from sao_core.store import shards, storage
from sao_core.store.layout import load_config, prepare_round, shard_target

REPO = Path(__file__).resolve().parents[2]


def test_llm_kwargs_on_cpu_force_float32_and_eager_mode() -> None:
    engine = EngineConfig(name="vllm", max_model_len=512)
    kwargs = llm_kwargs(engine, "/models/m", seed=7, on_cpu=True)
    assert kwargs["dtype"] == "float32"
    assert kwargs["enforce_eager"] is True
    assert kwargs["max_model_len"] == 512
    assert kwargs["seed"] == 7
    assert kwargs["max_num_seqs"] == 16  # engine.batch_size: the most sequences vLLM runs at once
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
    assert (
        llm_kwargs(engine.model_copy(update={"batch_size": 256}), "m", 0, on_cpu=False)["max_num_seqs"] == 256
    )
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


def test_interpreter_defaults_to_this_one_and_names_a_missing_one() -> None:
    assert interpreter(EngineConfig(name="vllm")) == sys.executable
    with pytest.raises(ConfigError, match=r"engine.python .*setup_vllm_env.sh"):
        interpreter(EngineConfig(name="vllm", python="/nonexistent/bin/python"))


# --- the worker child behind the shard runner ------------------------------------------------------------


def _round(tmp_path: Path, *overrides: str, root: str | None = None) -> tuple:
    cfg = load_config(
        str(REPO / "configs" / "tiny.yaml"),
        [
            f"run.root={root or tmp_path / 'art'}",
            "personas.n=8",
            "run.shard_size=2",
            "engine.name=vllm",
            *overrides,
        ],
    )
    round_dir = prepare_round(cfg)
    run_personas(cfg, round_dir)
    return cfg, round_dir


def _script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return str(path)


def _scripted_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **env: str) -> tuple[str, Path]:
    """engine.python for the scripted worker, and the log of the commands it received."""
    log = tmp_path / "worker-commands.jsonl"
    monkeypatch.setenv("SCRIPTED_LOG", str(log))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    worker = Path(__file__).with_name("scripted_vllm_worker.py")
    return _script(tmp_path, "python", f'exec {sys.executable} {worker} "$@"\n'), log


def _commands(log: Path, op: str) -> list[dict]:
    if not log.exists():
        return []
    return [c for c in map(json.loads, log.read_text().splitlines()) if c["op"] == op]


def _no_shard_written(round_dir: str, index: int) -> bool:
    out = storage.join(round_dir, "prompts", "_candidates")
    return shards.read_shard_manifest(out, index) is None and not storage.exists(
        storage.join(out, shards.shard_name(index, "jsonl"))
    )


def test_a_stage_on_vllm_loads_the_model_once_for_all_its_shards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    python, log = _scripted_worker(tmp_path, monkeypatch)
    # memory:// too: the shards are written by this process, not by the worker.
    cfg, round_dir = _round(
        tmp_path, f"engine.python={python}", "engine.max_model_len=256", "engine.batch_size=5",
        root="memory://vllm-held",
    )  # fmt: skip
    engines = EngineProvider(cfg)
    try:
        manifest = run_model_stage("prompts", cfg, round_dir, engines)
    finally:
        engines.close()
    assert engines.builds == 1 and len(manifest["shards"]) == 4
    starts, generates = _commands(log, "start"), _commands(log, "generate")
    assert len(starts) == 1 and len(generates) == 4
    assert len({c["pid"] for c in starts + generates}) == 1  # one worker process answered everything
    start = starts[0]
    assert start["engine"]["max_model_len"] == 256 and start["engine"]["batch_size"] == 5
    assert (Path(start["model_dir"]) / "config.json").is_file()  # resolved once, by the parent
    assert manifest["rows_in"] == 8 and manifest["engine"] == "vllm"
    assert sorted(len(g["requests"]) for g in generates) == [2, 2, 2, 2]
    assert _commands(log, "close")  # the worker was asked to exit
    # A finished stage is skipped without starting a worker at all.
    again = EngineProvider(cfg)
    assert run_model_stage("prompts", cfg, round_dir, again)["rows_out"] == manifest["rows_out"]
    assert again.builds == 0 and len(_commands(log, "start")) == 1


def test_a_killed_worker_fails_only_its_shard_and_the_retry_starts_a_new_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    python, log = _scripted_worker(tmp_path, monkeypatch, SCRIPTED_DIE_AT="2")
    cfg, round_dir = _round(tmp_path, f"engine.python={python}")
    engines = EngineProvider(cfg)
    try:
        first = run_shard("prompts", cfg, round_dir, 0, engines)
        with pytest.raises(
            EngineError,
            match=r"(?s)prompts shard 1: .*killed by SIGKILL \(killed: out of memory\?\).*KV cache",
        ):
            run_shard("prompts", cfg, round_dir, 1, engines)
        assert _no_shard_written(round_dir, 1)
        died = {c["pid"] for c in _commands(log, "start")}
        monkeypatch.setenv("SCRIPTED_DIE_AT", "0")
        retried = run_shard("prompts", cfg, round_dir, 1, engines)  # the task's retry, same process
    finally:
        engines.close()
    assert engines.builds == 2
    assert len({c["pid"] for c in _commands(log, "start")} - died) == 1  # a fresh worker
    assert retried.rows_in == 2 and retried.shard == 1
    out = storage.join(round_dir, "prompts", "_candidates")
    assert shards.read_shard_manifest(out, 0) == first  # the finished shard is untouched


def test_a_call_past_the_shard_timeout_ends_the_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    python, log = _scripted_worker(tmp_path, monkeypatch, SCRIPTED_SLEEP_S="120")
    cfg, round_dir = _round(tmp_path, f"engine.python={python}", "engine.shard_timeout_s=1.5")
    engines = EngineProvider(cfg)
    try:
        with pytest.raises(EngineError, match=r"prompts shard 0: .*ran past engine.shard_timeout_s=1.5s"):
            run_shard("prompts", cfg, round_dir, 0, engines)
        worker = engines._engine
        assert worker is not None and not worker.alive
    finally:
        engines.close()
    assert _no_shard_written(round_dir, 0)
    pid = _commands(log, "start")[0]["pid"]
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_worker_exit_code_fails_the_shard_with_its_last_log_lines(tmp_path: Path) -> None:
    python = _script(tmp_path, "crash.sh", 'for i in $(seq 1 60); do echo "log line $i"; done\nexit 3\n')
    cfg, round_dir = _round(tmp_path, f"engine.python={python}")
    with pytest.raises(EngineError) as info:
        run_shard("prompts", cfg, round_dir, 0, EngineProvider(cfg))
    message = str(info.value)
    assert "prompts shard 0" in message and "exited with code 3" in message
    assert "log line 60" in message and "log line 21" in message and "log line 20\n" not in message
    assert _no_shard_written(round_dir, 0)


def test_worker_killed_like_an_oom_names_the_signal(tmp_path: Path) -> None:
    python = _script(tmp_path, "oom.sh", 'echo "allocating"\nkill -9 $$\n')
    cfg, round_dir = _round(tmp_path, f"engine.python={python}")
    with pytest.raises(EngineError, match=r"(?s)killed by SIGKILL \(killed: out of memory\?\).*allocating"):
        run_shard("prompts", cfg, round_dir, 1, EngineProvider(cfg))
    assert _no_shard_written(round_dir, 1)


def test_worker_that_exits_without_answering_is_no_engine(tmp_path: Path) -> None:
    python = _script(tmp_path, "lazy.sh", "echo done\nexit 0\n")
    cfg, round_dir = _round(tmp_path, f"engine.python={python}")
    with pytest.raises(EngineError, match="exited with code 0"):
        run_shard("prompts", cfg, round_dir, 0, EngineProvider(cfg))
    assert _no_shard_written(round_dir, 0)


def test_worker_without_vllm_fails_with_the_import_error(tmp_path: Path) -> None:
    # This interpreter has no vllm: the real worker starts, then fails where vLLM is imported.
    cfg, round_dir = _round(tmp_path)
    with pytest.raises(EngineError, match=r"prompts shard 0: .*No module named 'vllm'"):
        run_shard("prompts", cfg, round_dir, 0, EngineProvider(cfg))
    assert _no_shard_written(round_dir, 0)


def test_vllm_engine_worker_start_failure_is_an_engine_error(tmp_path: Path) -> None:
    from sao_core.config import ModelConfig

    start = time.perf_counter()
    with pytest.raises(EngineError, match="No module named 'vllm'"):
        make_engine(EngineConfig(name="vllm"), ModelConfig(path="bundled:tiny-random-llama"))
    assert time.perf_counter() - start < 60


# --- the shard command by hand, with another engine ---------------------------------------------------


def _stage_command(stage: str, round_dir: str, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "sao_core.stages", stage, "--round", round_dir, *extra],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )  # fmt: skip


def test_shard_command_runs_by_hand_with_the_fake_engine(tmp_path: Path) -> None:
    cfg, round_dir = _round(tmp_path, "engine.name=fake")
    done = _stage_command("prompts", round_dir, "--shard", "1")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["stage"] == "prompts" and summary["shard"] == 1 and summary["rows_in"] == 2
    target = shard_target("prompts", cfg, round_dir, 1)
    entry = shards.shard_is_done(target.out_url, 1, target.input_sha256, target.settings_hash)
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


# --- a trained adapter (model.adapter) on vLLM ------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "rank"),
    [
        ({"r": 1}, 1),
        ({"r": 4}, 8),
        ({"r": 16}, 16),
        ({"r": 17}, 32),
        ({"r": 300}, 320),
        ({"r": 8, "rank_pattern": {"q_proj": 40}}, 64),  # a larger rank on some modules counts
        ({"r": 512}, 512),
    ],
)
def test_max_lora_rank_rounds_the_adapters_rank_up_to_one_vllm_accepts(
    tmp_path: Path, config: dict, rank: int
) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    assert max_lora_rank(str(tmp_path)) == rank
    assert rank in LORA_RANKS


def test_max_lora_rank_names_a_rank_vllm_cannot_serve_and_a_config_without_one(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text('{"r": 1024}')
    with pytest.raises(ConfigError, match=r"has rank 1024; vLLM serves ranks up to 512: merge it"):
        max_lora_rank(str(tmp_path))
    (tmp_path / "adapter_config.json").write_text('{"lora_alpha": 16}')
    with pytest.raises(ModelNotFoundError, match=r"no rank `r` in .*adapter_config\.json"):
        max_lora_rank(str(tmp_path))


def test_llm_kwargs_turn_lora_on_for_one_adapter() -> None:
    engine = EngineConfig(name="vllm")
    kwargs = llm_kwargs(engine, "/models/m", seed=0, on_cpu=True, lora_rank=16)
    assert (kwargs["enable_lora"], kwargs["max_lora_rank"], kwargs["max_loras"]) == (True, 16, 1)
    assert "enable_lora" not in llm_kwargs(engine, "/models/m", seed=0, on_cpu=True)


def _model_folder(url: str) -> str:
    files = {"config.json": b'{"model_type": "llama"}', "model.safetensors": b"weights"}
    for name, data in files.items():
        storage.write_bytes(storage.join(url, name), data)
    return url


def _adapter_folder(url: str, rank: int) -> str:
    files = {"adapter_config.json": json.dumps({"r": rank}).encode(), "adapter_model.safetensors": b"lora"}
    for name, data in files.items():
        storage.write_bytes(storage.join(url, name), data)
    return url


def test_the_parent_resolves_the_adapter_and_names_it_in_the_revision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sao_core.config import ModelConfig
    from sao_core.store.models import model_revision, resolve_adapter, resolve_model

    monkeypatch.setenv("SAO_CACHE", str(tmp_path / "cache"))
    python, log = _scripted_worker(tmp_path, monkeypatch)
    model = _model_folder(str(tmp_path / "base"))
    # At a URL the worker could not open (memory:// lives in this process): the parent fetches it.
    adapter = _adapter_folder("memory://round_001/model/adapter", rank=4)
    engine = make_engine(
        EngineConfig(name="vllm", python=python), ModelConfig(path=model, adapter=adapter), seed=0
    )
    try:
        engine.generate([ChatRequest.user("r0", "hi")], Sampling(0.0, 1.0, 8, 0))
    finally:
        engine.close()
    start = _commands(log, "start")[0]
    local = resolve_adapter(adapter)
    assert (
        start["adapter_dir"] == local and (Path(local) / "adapter_model.safetensors").read_bytes() == b"lora"
    )
    assert start["model"]["adapter"] == adapter
    base_revision = model_revision(model, resolve_model(model))
    assert engine.model_revision == f"{base_revision}+adapter:{model_revision(adapter, local)}"

    # Without an adapter the start command says so, and the revision is the base model's.
    base = make_engine(EngineConfig(name="vllm", python=python), ModelConfig(path=model), seed=0)
    base.close()
    assert _commands(log, "start")[1]["adapter_dir"] is None and base.model_revision == base_revision

    # A rank vLLM cannot serve fails here, before a worker starts and loads the model for nothing.
    too_big = _adapter_folder(str(tmp_path / "big"), rank=1024)
    with pytest.raises(ConfigError, match="has rank 1024"):
        make_engine(EngineConfig(name="vllm", python=python), ModelConfig(path=model, adapter=too_big))
    assert len(_commands(log, "start")) == 2
