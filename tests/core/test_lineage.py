"""Lineage (sao_core/campaign/lineage.py) on rounds made by the data stages with the scripted engine: every stage by URL
and digest, the parent model and its promotion, and any pair traced back to the persona that asked for it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from sao_core.campaign import ledger, planning
from sao_core.campaign.lineage import lineage, round_of, trace_pair, write_lineage
from sao_core.config import build_config
from sao_core.errors import ModelNotFoundError, StorageError
from sao_core.stages.synth import run_synth
from sao_core.store import shards, storage
from sao_core.store.layout import load_config, stage_url
from sao_core.training.launch import default_output_url
from tests.core.fake_training import fake_training_run

ROOT = Path(__file__).parents[2]
STAGES = ["personas", "prompts", "responses", "judgements", "pairs"]


def fake_cfg(root, k: int = 1, **model):
    return build_config(
        {
            "run": {"root": str(root), "campaign": "c", "shard_size": 4, "round": k},
            "engine": {"name": "fake"},
            "model": {"path": "bundled:tiny-random-llama", **model},
            "personas": {"n": 10},
            "prompts": {"max_tokens": 64},
            "responses": {"max_tokens": 128},
        }
    )


@pytest.fixture(scope="module")
def trained_round(tmp_path_factory):
    """(config, round folder, model folder) of a round made by the data stages and a fake training run."""
    cfg = fake_cfg(tmp_path_factory.mktemp("lineage"))
    round_dir = run_synth(cfg).round_url
    return cfg, round_dir, fake_training_run(cfg, round_dir)


def rows_by(round_dir: str, stage: str, key: str) -> dict[str, dict]:
    return {r[key]: r for r in shards.read_stage_rows(stage_url(round_dir, stage), "jsonl")}


def test_lineage_of_a_round_lists_every_stage_by_url_and_digest(trained_round):
    _, round_dir, model = trained_round
    lin = lineage(round_dir)
    assert (lin.round_dir, lin.campaign, lin.round) == (round_dir, "c", 1)
    assert (
        lin.config_hash == Path(round_dir, "config_hash").read_text().strip() and lin.config_hash in round_dir
    )
    config_bytes = Path(round_dir, "resolved_config.yaml").read_bytes()
    assert lin.resolved_config_sha256 == hashlib.sha256(config_bytes).hexdigest()
    assert lin.parent_model == {"path": "bundled:tiny-random-llama", "adapter": None, "revision": None}
    assert lin.parent_promotion is None
    assert [s.stage for s in lin.stages] == STAGES
    for s in lin.stages:
        manifest = shards.read_stage_manifest(s.url)
        shas = [e["sha256"] for e in manifest["shards"]]
        assert s.url == stage_url(round_dir, s.stage) and s.problem is None
        assert s.digest == hashlib.sha256("\x1f".join(shas).encode()).hexdigest()
        assert s.rows_out == manifest["rows_out"] and [x["sha256"] for x in s.shards] == shas
        assert all(Path(x["file"]).is_file() for x in s.shards)
    [m] = lin.models
    assert (m.url, m.objective, m.steps, m.pairs_match) == (model, "simpo", 2, True)
    assert m.adapter == storage.join(model, "adapter") and m.promotions == []
    text = lin.to_markdown()
    for needle in (round_dir, lin.config_hash, "bundled:tiny-random-llama", model, "the round's pairs"):
        assert needle in text


def test_lineage_of_a_model_names_its_round_and_promotions_and_the_next_round_names_its_parent(tmp_path):
    cfg = fake_cfg(tmp_path)
    round_dir = run_synth(cfg).round_url
    model = fake_training_run(cfg, round_dir)
    assert round_of(storage.join(model, "adapter")) == (round_dir, model)
    record = ledger.promote(str(tmp_path), "c", round_dir, model, who="ana", why="round 1 won")

    lin = lineage(model)
    assert lin.round_dir == round_dir
    [m] = lin.models
    assert [r["seq"] for r in m.promotions] == [1] and m.promotions[0]["why"] == "round 1 won"

    # Round 2 starts from the promoted model (SAO.md step 7): its lineage names it and the record.
    path, adapter = planning.start_model(fake_cfg(tmp_path, 2))
    round2 = run_synth(fake_cfg(tmp_path, 2, path=path, adapter=adapter)).round_url
    lin2 = lineage(round2)
    assert lin2.round == 2 and lin2.parent_model["adapter"] == storage.join(model, "adapter")
    assert lin2.parent_promotion is not None and lin2.parent_promotion["seq"] == record.seq
    assert lin2.parent_promotion["round_dir"] == round_dir
    assert lin2.models == []
    assert "promoted by record 1" in lin2.to_markdown()
    md = write_lineage(lin2)
    assert storage.read_text(md) == lin2.to_markdown()
    assert storage.read_json(storage.join(round2, "lineage.json"))["round"] == 2


def test_every_pair_traces_back_to_the_persona_that_asked_for_it(trained_round):
    _, round_dir, _ = trained_round
    pairs = shards.read_stage_rows(stage_url(round_dir, "pairs"), "jsonl")
    personas = rows_by(round_dir, "personas", "persona_id")
    prompts = rows_by(round_dir, "prompts", "prompt_id")
    assert pairs
    for pair in pairs:
        trace = trace_pair(round_dir, pair["prompt_id"])
        assert trace.problems == []
        assert [s.stage for s in trace.steps] == STAGES[::-1]
        persona = trace.step("personas").fields
        # An independent join: the prompt row of the pair's prompt id names the persona.
        expected = personas[prompts[pair["prompt_id"]]["persona_id"]]
        assert persona["persona_id"] == expected["persona_id"] and persona["persona"] == expected["persona"]
        assert trace.step("prompts").fields["prompt"] == pair["prompt"][0]["content"]
        assert trace.step("judgements").fields["chosen_response_id"] == pair["chosen_response_id"]
        for step in trace.steps:
            assert Path(step.url).is_file() and Path(step.url).parent.name == step.stage
            assert step.url.endswith(f"part-{step.shard:05d}.jsonl")
    by_response = trace_pair(round_dir, pairs[0]["rejected_response_id"])
    assert by_response.step("pairs").fields["prompt_id"] == pairs[0]["prompt_id"]
    text = by_response.to_markdown()
    assert (
        "every link holds" in text
        and personas[by_response.step("personas").fields["persona_id"]]["persona"][:40] in text
    )


def test_a_link_that_does_not_hold_is_reported(tmp_path):
    cfg = fake_cfg(tmp_path)
    round_dir = run_synth(cfg).round_url
    pairs_url = stage_url(round_dir, "pairs")
    rows, entry = shards.read_shard(pairs_url, 0, "jsonl")
    rows[0]["chosen"] = [{"role": "assistant", "content": "an answer nobody gave"}]
    rows[0]["persona_id"] = "pe-someone-else"
    shards.write_shard(pairs_url, 0, rows, [], "jsonl", entry)  # a consistent manifest, wrong content
    trace = trace_pair(round_dir, rows[0]["prompt_id"])
    assert any("chosen text of the pair differs" in p for p in trace.problems)
    assert any("persona_id" in p for p in trace.problems)
    with pytest.raises(StorageError, match="no pair in"):
        trace_pair(round_dir, "pr-nothing")


def test_verify_reads_every_shard_and_names_a_corrupted_one(tmp_path):
    cfg = fake_cfg(tmp_path)
    round_dir = run_synth(cfg).round_url
    assert all(s.problem is None for s in lineage(round_dir, verify=True).stages)
    shard = Path(stage_url(round_dir, "responses"), "part-00001.jsonl")
    shard.write_text(shard.read_text().replace("a", "b"))
    [responses] = [s for s in lineage(round_dir, verify=True).stages if s.stage == "responses"]
    assert "part-00001.jsonl does not match its manifest" in (responses.problem or "")
    assert "part-00001.jsonl does not match" in lineage(round_dir, verify=True).to_markdown()


def test_neither_a_round_nor_a_model_is_named(tmp_path):
    with pytest.raises(ModelNotFoundError, match="neither a round folder"):
        lineage(str(tmp_path / "nothing"))


@pytest.mark.tier1
def test_lineage_and_promotion_of_a_really_trained_tiny_model(tmp_path):
    """The tiny config end to end: data stages, real LoRA training, promotion, lineage, round 2's start."""
    from sao_core.store.models import resolve_adapter
    from sao_core.training import train

    tiny = str(ROOT / "configs/tiny.yaml")
    cfg = load_config(tiny, [f"run.root={tmp_path}"])
    round_dir = run_synth(cfg).round_url
    manifest = train(cfg, stage_url(round_dir, "pairs"))
    model = default_output_url(cfg)
    assert manifest["complete"] and planning.round_model(round_dir) == model

    record = ledger.promote(str(tmp_path), "tiny", round_dir, model, why="tiny round 1")
    [m] = lineage(model).models
    assert m.pairs_match is True and m.steps == manifest["steps"] and m.promotions[0]["seq"] == record.seq
    pair = shards.read_stage_rows(stage_url(round_dir, "pairs"), "jsonl")[0]
    assert trace_pair(round_dir, pair["prompt_id"]).problems == []

    path, adapter = planning.start_model(load_config(tiny, [f"run.root={tmp_path}", "run.round=2"]))
    assert (path, adapter) == ("bundled:tiny-random-llama", storage.join(model, "adapter"))
    assert adapter is not None and Path(resolve_adapter(adapter), "adapter_config.json").is_file()


@pytest.mark.tier1
def test_lineage_and_a_trace_on_real_s3(s3_env):
    cfg = fake_cfg(f"{s3_env}/artifacts")
    round_dir = run_synth(cfg).round_url
    model = fake_training_run(cfg, round_dir)
    lin = lineage(model)
    assert lin.round_dir == round_dir and round_dir.startswith("s3://")
    assert all(s.digest and s.problem is None for s in lineage(round_dir, verify=True).stages)
    assert lin.models[0].pairs_match is True
    pair = shards.read_stage_rows(stage_url(round_dir, "pairs"), "jsonl")[0]
    trace = trace_pair(round_dir, pair["prompt_id"])
    assert trace.problems == [] and trace.step("personas").url.startswith(f"{round_dir}/personas/part-")
