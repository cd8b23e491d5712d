"""fanout.mode replicas: the openai engine over two OpenAI-compatible replicas, shards as concurrent tasks.

    .venv/bin/python -m pytest -q tests/flows/test_replicas.py

Two scripted servers on 127.0.0.1 (tests/stub_openai.py) stand in for `vllm serve` replicas; the
round runs on the Prefect test harness with the tiny recipe (4 shards a stage, evaluation off). Each
chat call is traced back to its shard: the runner seeds every completion from its shard's seed and its
request id (a persona id, a prompt id, `prompt_id:a:b` for a verdict), so the requests it builds from a
stage's input shards name the shard of every call the replicas receive. No outcome depends on timing:
the replicas hold a stage's calls until every call of two of its shards is in flight at once.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from sao_core.config import RoundConfig
from sao_core.engines.provider import EngineProvider
from sao_core.engines.vllm import conversation, request_seed
from sao_core.errors import StorageError
from sao_core.stages import runner
from sao_core.store import shards, storage
from sao_core.store.layout import (
    MODEL_STAGES,
    evaluation_url,
    input_stage,
    load_config,
    num_shards,
    output_url,
    round_url,
    stage_url,
)
from sao_core.store.models import resolve_adapter
from sao_core.store.shards import read_stage_manifest
from tests.flows.conftest import task_runs
from tests.stub_openai import HANG_GUARD_S, StubServer, echo, in_background, serve_runtime_lora

ROOT = Path(__file__).parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
ID_KEY = {"prompts": "persona_id", "responses": "prompt_id", "judgements": "prompt_id"}
pytestmark = pytest.mark.tier1
T = TypeVar("T")


@dataclass(frozen=True)
class Call:
    """What one chat call is: a completion of one request of one shard."""

    stage: str
    shard: int
    request_id: str
    completion: int


class ShardCalls:
    """Which shard each chat call to the replicas belongs to, and which shards have calls in flight.

    Told by the replicas (StubServer's `watch`, under the replica's lock) when a call comes in and when
    it stops counting, before its answer leaves: a shard task that finishes on that answer cannot start
    the next shard's calls before this one is counted out, so no shard is ever counted one too many.
    """

    def __init__(self) -> None:
        self.cfg: RoundConfig | None = None  # the round's, once the replicas' URLs are in it (`follow`)
        self.round_dir = ""
        self.changed = threading.Condition()  # reentrant: a replica's callbacks nest here
        self.known: dict[tuple[int, str], Call] = {}
        self.expected: dict[str, list[Call]] = {}  # stage -> every call its shards make, once each
        self.received: list[tuple[int, Call | None]] = []  # (replica, call) as the calls came in
        self.in_flight: Counter[tuple[str, int]] = Counter()  # (stage, shard) -> its calls in flight
        self.most_in_flight = 0  # shards with calls in flight at once, at most, any stage
        self.together: set[frozenset[tuple[str, int]]] = set()  # shards seen in flight at once

    def follow(self, cfg: RoundConfig) -> str:
        """Trace the calls of this round; its folder."""
        self.cfg, self.round_dir = cfg, round_url(cfg)
        return self.round_dir

    def _load(self) -> None:
        """The calls of every stage whose input has finished, built as the runner builds them."""
        assert self.cfg is not None, "ShardCalls.follow(cfg) first"
        for stage in MODEL_STAGES:
            if stage in self.expected:
                continue
            try:
                count = num_shards(self.round_dir, stage)
            except StorageError:
                continue  # its input stage has not finished: none of its calls can have come yet
            calls = []
            for index in range(count):
                rows, _ = shards.read_shard(
                    stage_url(self.round_dir, input_stage(stage)), index, self.cfg.run.format
                )
                requests, _ = runner._build_and_parse(stage, self.cfg, rows)
                seed = runner._sampling(self.cfg, stage, index).seed
                for request in requests:
                    messages = json.dumps(conversation(request), sort_keys=True)
                    for j in range(request.n):
                        call = Call(stage, index, request.request_id, j)
                        self.known[(request_seed(seed, request.request_id, j), messages)] = call
                        calls.append(call)
            self.expected[stage] = calls

    def call_of(self, body: dict[str, Any]) -> Call | None:
        key = (int(body["seed"]), json.dumps(body["messages"], sort_keys=True))
        with self.changed:
            if key not in self.known:
                self._load()
            return self.known.get(key)

    def stage_of(self, body: dict[str, Any]) -> str | None:
        call = self.call_of(body)
        return call.stage if call else None

    def shards_in_flight(self, stage: str | None = None) -> set[tuple[str, int]]:
        return {key for key, n in self.in_flight.items() if n > 0 and stage in (None, key[0])}

    def watch(self, replica: int) -> Callable[[str, dict[str, Any]], None]:
        def seen(event: str, body: dict[str, Any]) -> None:
            call = self.call_of(body)
            with self.changed:
                if event == "start":
                    self.received.append((replica, call))
                if call is not None:
                    self.in_flight[(call.stage, call.shard)] += 1 if event == "start" else -1
                shards = self.shards_in_flight()
                self.most_in_flight = max(self.most_in_flight, len(shards))
                if len(shards) > 1:
                    self.together.add(frozenset(shards))
                self.changed.notify_all()

        return seen

    def answer(self, body: dict[str, Any]) -> str:
        """A prompt, an answer or a verdict, each one distinct (its seed), that the parsers keep."""
        stage = self.stage_of(body)
        if stage == "prompts":
            return f"User prompt: Plan a weekly budget for household number {body['seed']}."
        if stage == "responses":
            return f"Answer {body['seed']}: list the fixed costs first, then what is left to save."
        if stage == "judgements":
            return "ranking: 1 > 2"
        return echo(body)

    def _whole_shards_in_flight(self, stage: str) -> set[tuple[str, int]]:
        calls = Counter((c.stage, c.shard) for c in self.expected.get(stage, []))
        return {key for key in self.shards_in_flight(stage) if self.in_flight[key] == calls[key]}

    def wait_for_shards_in_flight(self, stage: str, n: int) -> set[tuple[str, int]]:
        """Block until every call of `n` shards of `stage` is in flight at once; those shards.

        Waiting for all their calls, not only the first, leaves a stage task that ignored its limit
        every chance to start one shard too many while they are held."""
        with self.changed:
            if not self.changed.wait_for(lambda: len(self._whole_shards_in_flight(stage)) >= n, HANG_GUARD_S):
                raise AssertionError(
                    f"{stage}: all calls of {n} shards never in flight at once; in flight: "
                    f"{dict(self.in_flight)}, calls received: {len(self.received)}"
                )
            return self._whole_shards_in_flight(stage)


def hold_stages(replicas: list[StubServer], shards: ShardCalls, stages: list[str]) -> None:
    """Every replica holds the calls of these stages (those of other stages go at once)."""
    held = frozenset(stages)
    for replica in replicas:
        replica.hold_calls(lambda body: shards.stage_of(body) in held)


def prove_shards_run_at_once(
    replicas: list[StubServer], shards: ShardCalls, stages: list[str], n: int
) -> dict[str, set[tuple[str, int]]]:
    """Stage by stage: hold its calls until every call of `n` of its shards is in flight together, then
    let them go (later stages stay held). Every call goes in the end, whatever happens here."""
    seen = {}
    try:
        for i, stage in enumerate(stages):
            hold_stages(replicas, shards, stages[i:])
            seen[stage] = shards.wait_for_shards_in_flight(stage, n)
    finally:
        for replica in replicas:
            replica.let_go()
    return seen


class EngineGets:
    """Shard tasks inside EngineProvider.get; the engine's build waits until two of them are, so a
    provider without its lock would build twice."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.callers = 0
        self.changed = threading.Condition()
        import tasks.engines

        get, make_engine = EngineProvider.get, tasks.engines.make_engine

        def counted_get(provider: EngineProvider) -> Any:
            with self.changed:
                self.callers += 1
                self.changed.notify_all()
            return get(provider)

        def build_once_two_wait(*args: Any, **kwargs: Any) -> Any:
            with self.changed:
                assert self.changed.wait_for(lambda: self.callers >= 2, HANG_GUARD_S), (
                    "only one shard task asked for the engine while it was being built"
                )
            return make_engine(*args, **kwargs)

        monkeypatch.setattr(EngineProvider, "get", counted_get)
        monkeypatch.setattr(tasks.engines, "make_engine", build_once_two_wait)


@pytest.fixture
def replicas() -> Iterator[list[StubServer]]:
    servers: list[StubServer] = []
    yield servers
    for server in servers:
        server.stop()


def start_replicas(servers: list[StubServer], shards: ShardCalls, count: int = 2) -> list[str]:
    for replica in range(count):
        servers.append(StubServer(answer=shards.answer, watch=shards.watch(replica)))
    return [s.url for s in servers]


def replica_overrides(tmp_path: Path, urls: list[str], *extra: str) -> list[str]:
    return [
        f"run.root={tmp_path}",
        "personas.n=16",
        "run.shard_size=4",
        "engine.name=openai",
        f"engine.base_urls=[{','.join(urls)}]",
        "engine.served_model_name=stub-model",
        # Room for every call of every shard at once: the connection pool is not what bounds shards.
        "engine.max_concurrency=32",
        "fanout.mode=replicas",
        "evaluation.enabled=false",
        *extra,
    ]


def check_stage_shards(cfg: RoundConfig, round_dir: str, stage: str, count: int, rows: int) -> None:
    """Every shard once, every input row answered once, and the manifest's exact counts: the stubs
    answer every call with 7 prompt and 5 completion tokens and nothing is dropped."""
    out_url = output_url(round_dir, stage)
    names = [u.rsplit("/", 1)[-1] for u in storage.list_files(storage.join(out_url, "_shards"), "*.json")]
    assert names == [f"part-{i:05d}.json" for i in range(count)], (stage, names)
    assert len(storage.list_files(out_url, "part-*")) == count, stage
    key = ID_KEY[stage]
    inputs, kept = [], []
    for index in range(count):
        in_rows, _ = shards.read_shard(stage_url(round_dir, input_stage(stage)), index, cfg.run.format)
        out_rows, entry = shards.read_shard(out_url, index, cfg.run.format)
        assert (entry.rows_in, entry.rows_out, entry.drops) == (len(in_rows), len(in_rows), {}), entry
        assert (entry.engine, entry.model_revision) == ("openai", "served:stub-model"), entry
        inputs += [r[key] for r in in_rows]
        kept += [r[key] for r in out_rows]
    assert sorted(kept) == sorted(inputs) and len(set(kept)) == len(kept) == rows, stage
    completions = {"prompts": 1, "responses": cfg.responses.k, "judgements": 1}[stage]
    manifest = shards.read_stage_manifest(stage_url(round_dir, stage))
    assert [s["shard"] for s in manifest["shards"]] == list(range(count))
    assert {k: manifest[k] for k in ("num_shards", "rows_in", "rows_out", "drops")} == {
        "num_shards": count,
        "rows_in": rows,
        "rows_out": rows,
        "drops": {},
    }, stage
    assert manifest["prompt_tokens"] == 7 * rows, stage  # one prompt per request
    assert manifest["completion_tokens"] == 5 * rows * completions, stage


def test_a_round_over_two_replicas_runs_each_stages_shards_concurrently(
    tmp_path: Path, prefect_api: None, replicas: list[StubServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.sao_round import sao_round
    from tasks.engines import engine_for, release_engine

    shards = ShardCalls()
    overrides = replica_overrides(tmp_path, start_replicas(replicas, shards))
    cfg = load_config(TINY, overrides)
    round_dir = shards.follow(cfg)
    release_engine(cfg)
    gets = EngineGets(monkeypatch)

    # No limit given: one shard in flight per replica, two at a time.
    hold_stages(replicas, shards, list(MODEL_STAGES))
    proof = in_background(prove_shards_run_at_once, replicas, shards, list(MODEL_STAGES), 2)
    state = sao_round(TINY, overrides, return_state=True)
    together = proof.result(timeout=HANG_GUARD_S)
    assert state.is_completed(), state
    result = state.result()
    assert result["round_dir"] == round_dir

    # Concurrent: each stage had calls of two of its shards in flight at once. Bounded: never three
    # shards, in any stage, across both replicas.
    assert {stage: len(found) for stage, found in together.items()} == dict.fromkeys(MODEL_STAGES, 2)
    assert shards.most_in_flight == 2, sorted(map(sorted, shards.together))

    # Every call the shards make came once, and both replicas served each stage, an even share each.
    assert [c for _, c in shards.received if c is None] == []
    received = Counter(c for _, c in shards.received)
    expected = [c for stage in MODEL_STAGES for c in shards.expected[stage]]
    assert len(expected) == 16 + 16 * cfg.responses.k + 16
    assert received == Counter(expected), "a call went twice or never"
    for replica, server in enumerate(replicas):
        stages = Counter(c.stage for r, c in shards.received if r == replica and c is not None)
        assert stages == {"prompts": 8, "responses": 16, "judgements": 8}, (replica, stages)
        assert server.answered == len(server.calls) == 32

    # One engine for the whole round, although two shard tasks asked for it while it was being built.
    assert gets.callers >= 2
    provider = engine_for(cfg)
    assert provider.builds == 1, provider.builds
    assert [server.models_calls for server in replicas] == [1, 1]
    release_engine(cfg)

    for stage in MODEL_STAGES:
        check_stage_shards(cfg, round_dir, stage, count=4, rows=16)
    assert read_stage_manifest(stage_url(round_dir, "pairs"))["rows_out"] == 16
    runs = task_runs(state.state_details.flow_run_id)
    for stage in MODEL_STAGES:
        for index in range(4):
            assert runs.get(f"{stage}-shard-{index:05d}") == ["Completed"], (stage, index, runs)
    assert runs["train-round-1"] == ["Completed"] and "evaluate-round-1" not in runs


def test_fanout_concurrency_bounds_the_shards_in_flight(
    tmp_path: Path, prefect_api: None, replicas: list[StubServer]
) -> None:
    """fanout.concurrency=3 over two replicas: three of the six shards in flight at once, never four."""
    from prefect import flow

    from tasks.config import resolve_config
    from tasks.engines import release_engine
    from tasks.personas import sample_personas
    from tasks.prompts import synthesize_prompts

    @flow(name="sao-prompts")
    def prompts_only(config: str, overrides: list[str]) -> dict[str, Any]:
        ref = resolve_config(config, overrides)
        personas = sample_personas(ref, ref["settings"]["personas"])
        return synthesize_prompts(ref, ref["settings"]["prompts"], personas["url"])

    shards = ShardCalls()
    overrides = replica_overrides(
        tmp_path, start_replicas(replicas, shards), "personas.n=24", "fanout.concurrency=3"
    )
    cfg = load_config(TINY, overrides)
    round_dir = shards.follow(cfg)
    release_engine(cfg)

    hold_stages(replicas, shards, ["prompts"])
    proof = in_background(prove_shards_run_at_once, replicas, shards, ["prompts"], 3)
    prompts = prompts_only(TINY, overrides)
    assert len(proof.result(timeout=HANG_GUARD_S)["prompts"]) == 3
    assert shards.most_in_flight == 3, sorted(map(sorted, shards.together))
    assert prompts["summary"]["rows_out"] == 24
    check_stage_shards(cfg, round_dir, "prompts", count=6, rows=24)
    release_engine(cfg)


def test_the_evaluation_loads_the_lora_policy_into_the_replicas_and_unloads_it(
    tmp_path: Path, prefect_api: None, replicas: list[StubServer]
) -> None:
    """Issue 18, 6: engine openai with evaluation on (no evaluation.engine): the trained adapter is loaded
    into both running replicas at run time, the candidate's answers are asked of it there as shard
    tasks, then it is unloaded; the current model and the judge answer as the served base."""
    from flows.sao_round import sao_round
    from tasks.engines import free_engines

    shards_seen = ShardCalls()

    def answer(body: dict[str, Any]) -> str:
        said = shards_seen.answer(body)
        return f"{body['model']} says: {said}" if body["model"].startswith("sao-lora-") else said

    for replica in range(2):
        replicas.append(serve_runtime_lora(StubServer(answer=answer, watch=shards_seen.watch(replica))))
    overrides = replica_overrides(
        tmp_path,
        [s.url for s in replicas],
        "evaluation.enabled=true",
        "evaluation.n=8",
        "evaluation.trust_n=4",
        "evaluation.shard_size=4",
        "evaluation.bootstrap=100",
        "evaluation.downstream.enabled=false",
    )
    cfg = load_config(TINY, overrides)
    shards_seen.follow(cfg)
    free_engines()
    state = sao_round(TINY, overrides, return_state=True)
    assert state.is_completed(), state
    result = state.result()
    evaluation = result["evaluation"]
    assert evaluation["url"] == evaluation_url(result["model"], cfg)
    adapter = storage.join(result["model"], "adapter")
    assert evaluation["candidate"] == f"{cfg.model.path} + adapter {adapter}"

    # Each replica: loaded once, the candidate's calls, unloaded once; nothing else asked for the adapter.
    names = set()
    for server in replicas:
        (load, body), (unload, gone) = server.lora_log  # type: ignore[attr-defined]
        assert (load, unload) == ("load", "unload") and gone == {"lora_name": body["lora_name"]}
        assert body["lora_path"] == resolve_adapter(adapter)
        names.add(body["lora_name"])
        asked = [i for i, c in enumerate(server.calls) if c["model"] == body["lora_name"]]
        loaded_at, unloaded_at = server.lora_at  # type: ignore[attr-defined]
        assert asked and loaded_at <= min(asked) and max(asked) < unloaded_at, (server.lora_at, asked)
    [name] = names
    answers = shards.read_stage_rows(storage.join(evaluation["url"], "answers-candidate"), cfg.run.format)
    assert len(answers) == 8 and all(a["answer"].startswith(f"{name} says:") for a in answers)
    current = shards.read_stage_rows(storage.join(evaluation["url"], "answers-current"), cfg.run.format)
    assert not any(a["answer"].startswith(name) for a in current)
    assert sum(c["model"] == name for s in replicas for c in s.calls) == 8

    runs = task_runs(state.state_details.flow_run_id)
    for stage, count in (("answers-candidate", 2), ("answers-current", 2), ("verdicts", 3)):
        for index in range(count):
            assert runs.get(f"{stage}-shard-{index:05d}") == ["Completed"], (stage, index, runs)
    assert runs["evaluate-round-1"] == ["Completed"]
    free_engines()
