"""The vllm engine for real: vLLM's CPU build in .venv-vllm, one worker child held by the shard runner.

Needs the environment that scripts/setup_vllm_env.sh builds (`make test` builds it first and sets
SAO_REQUIRE_VLLM=1, which turns a missing environment into a failure; a plain `pytest` skips). Each
vLLM start costs about 30-45 s on 2 cores, so every test here starts as few as it can.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from sao_core.config import RoundConfig
from sao_core.engines import ChatRequest, Completion, Sampling, make_engine
from sao_core.engines.provider import EngineProvider
from sao_core.engines.vllm import VLLMEngine
from sao_core.errors import EngineError
from sao_core.stages.no_model import run_personas
from sao_core.stages.runner import run_model_stage, run_shard
from sao_core.store import shards, storage
from sao_core.store.layout import load_config, prepare_round, shard_target
from sao_core.store.models import model_revision, resolve_model

REPO = Path(__file__).resolve().parents[2]
VLLM_VENV = REPO / ".venv-vllm"
TINY = "bundled:tiny-random-llama"
SMOLLM2 = "bundled:smollm2-135m-instruct"
SHORT_QUESTIONS = (
    "What is the capital of France? Answer in one sentence.",
    "Name the three primary colors.",
    "What is 7 times 8?",
    "Give one synonym for happy.",
    "Which planet is closest to the sun?",
    "Translate 'thank you' into Spanish.",
    "What color is the sky on a clear day?",
    "How many days are in a week?",
)

pytestmark = [pytest.mark.vllm, pytest.mark.tier1]


def _config(tmp_path: Path, python: str, model: str, *overrides: str) -> RoundConfig:
    return load_config(
        str(REPO / "configs" / "tiny.yaml"),
        [
            f"run.root={tmp_path / 'art'}",
            f"model.path={model}",
            "engine.name=vllm",
            f"engine.python={python}",
            "engine.max_model_len=2048",
            *overrides,
        ],
    )


def _session_members(sid: int) -> list[int]:
    """Processes whose session is `sid` (a vLLM child and the engine processes it started)."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":  # a zombie is dead, waiting for init to reap it
                members.append(int(entry.name))
    return members


def _session_ends(sid: int, within: float = 15.0) -> bool:
    deadline = time.monotonic() + within
    while _session_members(sid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not _session_members(sid)


def test_tiny_shards_share_one_worker_and_a_killed_worker_is_replaced(
    vllm_python: str, tmp_path: Path
) -> None:
    cfg = _config(tmp_path, vllm_python, TINY, "personas.n=12", "run.shard_size=4", "prompts.max_tokens=24")
    round_dir = prepare_round(cfg)
    run_personas(cfg, round_dir)
    out = storage.join(round_dir, "prompts", "_candidates")

    engines = EngineProvider(cfg)
    try:
        entry = run_shard("prompts", cfg, round_dir, 0, engines)
        second = run_shard("prompts", cfg, round_dir, 1, engines)
        assert engines.builds == 1  # two shards, one model load
        worker = engines._engine
        assert isinstance(worker, VLLMEngine) and worker.alive
        sid = worker._child.proc.pid

        # An OOM kill between shards, as the kernel does it: the next shard starts a new worker.
        os.kill(sid, signal.SIGKILL)
        worker._child.proc.wait(timeout=30)  # died while idle, before the next shard asks for it
        third = run_shard("prompts", cfg, round_dir, 2, engines)
        assert engines.builds == 2
        assert _session_ends(sid)  # the dead engine was closed: its engine-core processes went with it
    finally:
        engines.close()

    assert (entry.engine, entry.model, entry.rows_in) == ("vllm", TINY, 4)
    assert entry.model_revision == model_revision(TINY, resolve_model(TINY))
    for e in (entry, second, third):
        assert e.rows_out + sum(e.drops.values()) == 4
        assert 0 < e.completion_tokens <= 4 * 24 and e.prompt_tokens > 0
    dropped = shards.decode_rows(
        storage.read_bytes(storage.join(out, entry.dropped_file or "")), "jsonl", "x"
    )
    assert all(row["finish_reason"] in ("stop", "length") and "raw_output" in row for row in dropped)
    target = shard_target("prompts", cfg, round_dir, 0)
    assert shards.shard_is_done(out, 0, target.input_sha256, target.settings_hash) == entry

    again = EngineProvider(cfg)
    assert run_shard("prompts", cfg, round_dir, 0, again) == entry  # done: no worker at all
    assert again.builds == 0


def test_a_worker_that_fails_to_start_is_reported_with_the_reason(vllm_python: str, tmp_path: Path) -> None:
    # The tiny model allows 2048 positions: vLLM refuses a longer context while starting.
    cfg = _config(tmp_path, vllm_python, TINY, "personas.n=2", "engine.max_model_len=100000")
    round_dir = prepare_round(cfg)
    run_personas(cfg, round_dir)
    with pytest.raises(EngineError) as info:
        run_shard("prompts", cfg, round_dir, 0, EngineProvider(cfg))
    message = str(info.value)
    assert message.startswith(f"prompts shard 0: vllm engine ({TINY})")
    assert "max_model_len" in message and "100000" in message
    assert shards.read_shard_manifest(storage.join(round_dir, "prompts", "_candidates"), 0) is None


class ShortQuestions:
    """A prompt writer that asks questions with short answers, so SmolLM2's answers finish in a test."""

    name = "scripted"
    model = "scripted"
    model_revision = "scripted"

    def generate(self, requests: Sequence[ChatRequest], sampling: Sampling) -> list[list[Completion]]:
        return [
            [Completion(f"User prompt: {SHORT_QUESTIONS[i % len(SHORT_QUESTIONS)]}", "stop", 10, 10)] * r.n
            for i, r in enumerate(requests)
        ]

    def close(self) -> None:
        pass


@pytest.mark.usefixtures("smollm2")
def test_smollm2_answers_and_judges_on_one_vllm_worker_per_stage(vllm_python: str, tmp_path: Path) -> None:
    cfg = _config(
        tmp_path, vllm_python, SMOLLM2, "personas.n=8", "run.shard_size=8", "responses.max_tokens=96",
        "judging.max_tokens=16",
    )  # fmt: skip
    round_dir = prepare_round(cfg)
    run_personas(cfg, round_dir)
    scripted = cfg.model_copy(update={"engine": cfg.engine.model_copy(update={"name": "fake"})})
    run_model_stage("prompts", scripted, round_dir, EngineProvider(scripted, factory=ShortQuestions))

    engines = EngineProvider(cfg)
    try:
        responses = run_model_stage("responses", cfg, round_dir, engines)
        judgements = run_model_stage("judgements", cfg, round_dir, engines)
    finally:
        engines.close()
    assert engines.builds == 1  # answers and judgements on one load
    assert (responses["engine"], responses["model"], responses["rows_in"]) == ("vllm", SMOLLM2, 8)
    assert responses["model_revision"] == model_revision(SMOLLM2, resolve_model(SMOLLM2))
    assert responses["rows_out"] >= 4, responses  # short questions: most pairs of answers finish
    assert responses["completion_tokens"] > 8 * 2
    rows = shards.read_stage_rows(storage.join(round_dir, "responses"), "jsonl")
    assert len(rows) == responses["rows_out"]

    assert judgements["engine"] == "vllm" and judgements["rows_in"] == responses["rows_out"]
    assert judgements["completion_tokens"] > 0
    assert judgements["diagnostics"]["verdicts"] == responses["rows_out"]


@pytest.mark.usefixtures("smollm2")
def test_vllm_engine_holds_one_worker_and_matches_transformers_greedy(vllm_python: str) -> None:
    cfg = load_config(
        str(REPO / "configs" / "tiny.yaml"),
        [
            f"model.path={SMOLLM2}",
            "engine.name=vllm",
            f"engine.python={vllm_python}",
            "engine.max_model_len=2048",
        ],
    )
    requests = [ChatRequest.user(f"q{i}", q) for i, q in enumerate(SHORT_QUESTIONS)]
    prefilled = [ChatRequest.user("p0", "Suggest a question a teacher might ask.", prefill="User prompt:")]
    greedy = Sampling(temperature=0.0, top_p=1.0, max_tokens=24, seed=0)
    engine = make_engine(cfg.engine, cfg.model, seed=0)
    assert isinstance(engine, VLLMEngine)
    try:
        ours = engine.generate(requests + prefilled, greedy)
        again = engine.generate(requests[:2], greedy)  # the same worker: no second start-up
    finally:
        engine.close()
    assert _session_ends(engine._child.proc.pid)
    assert again == ours[:2]
    assert ours[-1][0].text.startswith("User prompt:") and len(ours[-1][0].text) > len("User prompt:")

    reference = make_engine(cfg.engine.model_copy(update={"name": "transformers"}), cfg.model, seed=0)
    try:
        theirs = reference.generate(requests + prefilled, greedy)
    finally:
        reference.close()
    # Same chat template and prefill handling: the same prompt tokens, and (fp32, greedy) nearly always
    # the same answers; a near-tie in the logits may flip a token now and then.
    assert [o[0].prompt_tokens for o in ours] == [o[0].prompt_tokens for o in theirs]
    assert all(o[0].finish_reason in ("stop", "length") for o in ours)
    same = sum(a[0].text == b[0].text for a, b in zip(ours, theirs, strict=True))
    assert same >= 7, [(a[0].text, b[0].text) for a, b in zip(ours, theirs, strict=True)]
