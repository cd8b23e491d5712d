"""The evaluation against the current model and the original, the judge-trust rating, and decontamination.

The fake engine's judge prefers the longer answer and, on equal lengths, Response 1: every expected
verdict below is computed from the answers' lengths, independently of sao_core.evaluation.winrate.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from sao_core.chat import ChatRequest, Completion, Sampling
from sao_core.config import build_config
from sao_core.engines.fake import FakeEngine
from sao_core.engines.provider import EngineProvider
from sao_core.evaluation.compare import Contender, evaluate_candidate, headline
from sao_core.evaluation.eval_stages import stage_config, write_contenders
from sao_core.stages.no_model import run_personas
from sao_core.stages.runner import run_model_stage
from sao_core.store import shards, storage
from sao_core.store.evalsets import load_eval_prompts, load_judge_trust
from sao_core.store.layout import downstream_url, evaluation_url, prepare_round
from sao_core.store.shards import read_stage_rows


def _fake(cfg: Any, seed: int) -> EngineProvider:
    return EngineProvider(cfg, lambda: FakeEngine(cfg.engine.fake, seed=seed))


def _rows(url: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in storage.read_text(url).splitlines()]


def _expected_preference(candidate: str, baseline: str) -> float:
    if len(candidate) > len(baseline):
        return 1.0
    if len(candidate) < len(baseline):
        return 0.0
    return 0.5  # Response 1 wins both orders: the orders disagree


def test_win_rate_and_trust_follow_the_judge(tmp_path: Any) -> None:
    cfg = build_config({"engine": {"name": "fake"}, "evaluation": {"n": 20, "trust_n": 30, "bootstrap": 500}})
    out = str(tmp_path / "eval")
    judge_engine = _fake(cfg, 0)
    m = evaluate_candidate(
        cfg,
        Contender("candidate", "cand", _fake(cfg, 1)),
        [Contender("current", "cur", judge_engine), Contender("original", "orig", _fake(cfg, 2))],
        Contender("judge", "cur", judge_engine),
        out,
    )
    prompts = load_eval_prompts("builtin", 20)
    cand = {r["id"]: r["answer"] for r in read_stage_rows(f"{out}/answers-candidate", "jsonl")}
    assert (
        m["prompts"] == 20 and set(m["comparisons"]) == {"current", "original"} and m["primary"] == "current"
    )
    for name in ("current", "original"):
        base = {r["id"]: r["answer"] for r in read_stage_rows(f"{out}/answers-{name}", "jsonl")}
        want = [_expected_preference(cand[p.id], base[p.id]) for p in prompts]
        rows = _rows(f"{out}/results-{name}.jsonl")
        assert [r["preference"] for r in rows] == want
        c = m["comparisons"][name]
        assert c["win_rate"] == pytest.approx(sum(want) / 20)
        assert (c["wins"], c["losses"], c["ties"]) == (want.count(1.0), want.count(0.0), want.count(0.5))
        assert c["win_rate_ci_low"] <= c["win_rate"] <= c["win_rate_ci_high"]
        assert c["order_inconsistent_share"] == pytest.approx(want.count(0.5) / 20)
        assert c["lc_win_rate"] is not None and 0 < c["lc_win_rate"] < 1
    assert m["win_rate"] == m["comparisons"]["current"]["win_rate"]

    # Trust: right in an order when the better answer is the longer one (or equal and shown first).
    items = load_judge_trust()[:30]
    right = sum((len(t.better) >= len(t.worse)) + (len(t.better) > len(t.worse)) for t in items)
    assert m["trust"]["items"] == 30 and m["trust"]["valid_verdicts"] == 60
    assert m["trust"]["agreement"] == pytest.approx(right / 60)
    assert m["judge_agreement"] == m["trust"]["agreement"]
    assert len(_rows(f"{out}/trust.jsonl")) == 30
    assert storage.read_json(f"{out}/manifest.json") == m
    table = headline(m)
    assert [r["vs"].split(" ")[0] for r in table] == ["current", "original", "judge"]


def test_a_judge_that_never_answers_gives_a_coin_and_no_evidence(tmp_path: Any) -> None:
    class Mute:
        name = model = model_revision = "mute"

        def generate(self, requests: list[ChatRequest], sampling: Sampling) -> list[list[Completion]]:
            return [[Completion("I cannot decide.", "stop", 1, 3)] for _ in requests]

        def close(self) -> None:
            pass

    cfg = build_config({"engine": {"name": "fake"}, "evaluation": {"n": 5, "trust_n": 4, "bootstrap": 100}})
    mute = EngineProvider(cfg, Mute)
    m = evaluate_candidate(
        cfg,
        Contender("candidate", "c", _fake(cfg, 1)),
        [Contender("current", "b", _fake(cfg, 0))],
        Contender("judge", "mute", mute),
        str(tmp_path / "eval"),
    )
    c = m["comparisons"]["current"]
    # Every unparseable verdict counts as a tie (win rate) and as wrong (agreement), with the counts that
    # let the promotion gate say "not enough evidence" (issue 17).
    assert c["win_rate"] == 0.5 and c["invalid"] == 5 and c["complete"] == 0 and c["valid_verdicts"] == 0
    assert m["trust"]["agreement"] == 0.0 and m["trust"]["valid_verdicts"] == 0


class Copycat:
    """A prompt writer that, for one persona in four, writes an evaluation instruction word for word."""

    name = model = model_revision = "copycat"

    def __init__(self, instructions: list[str]) -> None:
        self.instructions = instructions
        self.calls = 0

    def generate(self, requests: list[ChatRequest], sampling: Sampling) -> list[list[Completion]]:
        out = []
        for i, r in enumerate(requests):
            copied = self.instructions[self.calls] if i == 0 else None
            text = copied or f"How do I plan a trip number {r.request_id}?"
            out.append([Completion(f"User prompt: {text}", "stop", 5, 9)])
        self.calls += 1
        return out

    def close(self) -> None:
        pass


def test_prompts_that_overlap_the_evaluation_set_are_dropped_and_counted(tmp_path: Any) -> None:
    cfg = build_config(
        {"run": {"root": str(tmp_path), "shard_size": 4}, "engine": {"name": "fake"}, "personas": {"n": 8}}
    )
    round_dir = prepare_round(cfg)
    run_personas(cfg, round_dir)
    long_ones = [p.instruction for p in load_eval_prompts("builtin") if len(p.instruction.split()) >= 13]
    manifest = run_model_stage("prompts", cfg, round_dir, EngineProvider(cfg, lambda: Copycat(long_ones)))
    d = manifest["decontamination"]
    assert d["enabled"] and d["n"] == 13 and d["checked"] == 8 and d["dropped"] == 2
    assert len(d["eval_ids_hit"]) == 2
    assert manifest["drops"].get("eval_overlap") == 2 and manifest["rows_out"] == 6

    off = cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(update={"decontamination_n": 0})})
    other = prepare_round(off)
    assert other != round_dir  # what the stage drops names the round
    run_personas(off, other)
    kept = run_model_stage("prompts", off, other, EngineProvider(off, lambda: Copycat(long_ones)))
    assert kept["rows_out"] == 8 and kept["decontamination"] == {"enabled": False}


class Counting:
    """The fake engine, counting the requests it was asked (a resumed stage asks for none)."""

    def __init__(self, cfg: Any, seed: int) -> None:
        self.engine = FakeEngine(cfg.engine.fake, seed=seed)
        self.name, self.model, self.model_revision = "fake", f"fake-{seed}", "fake"
        self.requests = 0

    def generate(self, requests: list[ChatRequest], sampling: Sampling) -> list[list[Completion]]:
        self.requests += len(requests)
        return self.engine.generate(requests, sampling)

    def close(self) -> None:
        pass


def test_evaluation_stages_are_sharded_and_resume_where_they_stopped(tmp_path: Any) -> None:
    cfg = build_config(
        {
            "run": {"shard_size": 4},
            "engine": {"name": "fake"},
            "evaluation": {"n": 10, "trust_n": 6, "bootstrap": 100},
        }
    )
    engines = {name: Counting(cfg, seed) for seed, name in enumerate(("current", "candidate", "judge"))}

    def run() -> dict[str, Any]:
        return evaluate_candidate(
            cfg,
            Contender("candidate", "cand", EngineProvider(cfg, lambda: engines["candidate"])),
            [Contender("current", "cur", EngineProvider(cfg, lambda: engines["current"]))],
            Contender("judge", "cur", EngineProvider(cfg, lambda: engines["judge"])),
            out,
        )

    out = str(tmp_path / "eval")
    first = run()
    # 10 instructions in shards of 4; the judge's cases: 10 comparisons (3 shards), 6 trust pairs (2).
    for stage, count in (("answers-candidate", 3), ("answers-current", 3), ("verdicts", 5)):
        manifest = shards.read_stage_manifest(f"{out}/{stage}")
        assert manifest["num_shards"] == count, stage
    assert {k: e.requests for k, e in engines.items()} == {"candidate": 10, "current": 10, "judge": 32}

    # Done: nothing is asked again, and the same manifest comes back.
    assert run() == first
    assert {k: e.requests for k, e in engines.items()} == {"candidate": 10, "current": 10, "judge": 32}

    # One shard of the baseline's answers lost: only it is answered again; its answers come out the same,
    # so the judge's cases are unchanged and nothing is judged again.
    storage.remove(f"{out}/answers-current/_shards/part-00001.json")
    again = run()
    assert (engines["candidate"].requests, engines["current"].requests, engines["judge"].requests) == (
        10,
        14,
        32,
    )
    # One shard of verdicts lost (the last: 2 trust pairs, both orders): only it is judged again.
    storage.remove(f"{out}/verdicts/_shards/part-00004.json")
    third = run()
    assert (engines["current"].requests, engines["judge"].requests) == (14, 32 + 4)
    for result in (again, third):
        assert {k: v for k, v in result.items() if k != "seconds"} == {
            k: v for k, v in first.items() if k != "seconds"
        }


def test_evaluation_shard_size_changes_the_shards_not_the_results(tmp_path: Any) -> None:
    """evaluation.shard_size lays out the evaluation's stages whatever run.shard_size is; the rows, the
    verdicts and the result are the same as at run.shard_size."""
    results, layouts = {}, {}
    for size in (None, 8):
        cfg = build_config(
            {
                "run": {"shard_size": 2},
                "engine": {"name": "fake"},
                "evaluation": {"n": 10, "trust_n": 6, "bootstrap": 100, "shard_size": size},
            }
        )

        def provider(seed: int, cfg: Any = cfg) -> EngineProvider:
            return EngineProvider(cfg, lambda: Counting(cfg, seed))

        out = str(tmp_path / f"eval-{size}")
        result = evaluate_candidate(
            cfg,
            Contender("candidate", "cand", provider(1)),
            [Contender("current", "cur", provider(0))],
            Contender("judge", "cur", provider(2)),
            out,
        )
        # Less the time, the settings hash and the verdicts manifest's digest, which name the layout.
        results[size] = {
            k: v for k, v in result.items() if k not in {"seconds", "settings_hash", "verdicts_sha256"}
        }
        results[size]["verdict rows"] = shards.read_stage_rows(f"{out}/verdicts", cfg.run.format)
        layouts[size] = {
            stage: shards.read_stage_manifest(f"{out}/{stage}")["num_shards"]
            for stage in ("eval_prompts", "answers-candidate", "answers-current", "verdicts")
        }
    # 10 instructions and 10 comparisons + 6 trust pairs: in shards of 2, then of 8.
    assert layouts[None] == {"eval_prompts": 5, "answers-candidate": 5, "answers-current": 5, "verdicts": 8}
    assert layouts[8] == {"eval_prompts": 2, "answers-candidate": 2, "answers-current": 2, "verdicts": 3}
    assert results[8] == results[None] and len(results[8]["verdict rows"]) == 16
    # The evaluation's folder names the layout it was made with, whichever key set it.
    eval_at_run_size = build_config({"run": {"shard_size": 8}, "engine": {"name": "fake"}})
    eval_set = build_config(
        {"run": {"shard_size": 2}, "engine": {"name": "fake"}, "evaluation": {"shard_size": 8}}
    )
    model = str(tmp_path / "model")
    assert evaluation_url(model, eval_at_run_size) == evaluation_url(model, eval_set)
    assert evaluation_url(model, eval_set) != evaluation_url(
        model, build_config({"engine": {"name": "fake"}})
    )


def test_evaluation_results_are_kept_apart_by_their_settings(tmp_path: Any) -> None:
    """Issue 17, 8b: {model}/eval/{settings hash}/, so a result is served only for the settings that made it."""
    base = build_config({"engine": {"name": "fake"}})
    model = str(tmp_path / "model")
    url = evaluation_url(model, base)
    assert url.startswith(f"{model}/eval/")
    for change in (
        {"evaluation": {"max_tokens": 64}},
        {"evaluation": {"n": 5}},
        {"evaluation": {"trust_n": 5}},
        {"evaluation": {"judge": {"engine": {"name": "fake", "fake": {"position_bias": 0.5}}}}},
        {"judging": {"prefill": "ranking: "}},
        {"model": {"path": "other"}},
    ):
        other = build_config({"engine": {"name": "fake"}, **change})
        assert evaluation_url(model, other) != url, change
    # What the evaluation does not read keeps its folder: downstream, the data stages, training.
    for same in (
        {"evaluation": {"downstream": {"limit": 3}}},
        {"responses": {"k": 3}},
        {"training": {"beta": 2.0}},
    ):
        assert evaluation_url(model, build_config({"engine": {"name": "fake"}, **same})) == url, same
    assert downstream_url(model, base) != downstream_url(
        model, build_config({"engine": {"name": "fake"}, "evaluation": {"downstream": {"limit": 3}}})
    )


def test_a_worker_finds_each_evaluation_stages_model_from_the_round_config_and_the_folder(
    tmp_path: Any,
) -> None:
    cfg = build_config({"engine": {"name": "fake"}, "evaluation": {"original": "bundled:tiny-random-llama"}})
    out = str(tmp_path / "model" / "eval" / "h")
    model = {"url": str(tmp_path / "model"), "adapter": str(tmp_path / "model" / "adapter"), "full": None}
    write_contenders(cfg, out, model)
    assert stage_config(cfg, "answers-candidate", out).model.adapter == model["adapter"]
    assert stage_config(cfg, "answers-current", out).model == cfg.model
    assert stage_config(cfg, "answers-original", out).model.path == "bundled:tiny-random-llama"
    assert stage_config(cfg, "verdicts", out).model == cfg.model
    with pytest.raises(ValueError, match="unknown evaluation stage 'answers-someone'"):
        stage_config(cfg, "answers-someone", out)
