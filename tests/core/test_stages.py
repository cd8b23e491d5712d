"""The five data stages over the artifact store, with the scripted engine."""

from collections import Counter

import pytest

from sao_core.config import build_config
from sao_core.engines.fake import FakeEngine
from sao_core.engines.provider import EngineProvider
from sao_core.errors import EngineError, PersonaSourceError
from sao_core.stages.synth import run_synth
from sao_core.store import shards, storage
from sao_core.store.layout import stage_url


def fake_cfg(root, *overrides):
    return build_config(
        {
            "run": {"root": str(root), "campaign": "c", "shard_size": 5},
            "engine": {"name": "fake"},
            "personas": {"n": 20},
            "prompts": {"max_tokens": 64},
            "responses": {"max_tokens": 128},
        },
        list(overrides),
    )


class CountingEngine(FakeEngine):
    """The fake engine, recording which requests it answered, optionally failing on one of them."""

    def __init__(self, cfg, fail_on_call: tuple[str, int] | None = None):
        super().__init__(cfg.engine.fake, seed=cfg.run.seed)
        self.seen: list[str] = []
        self.calls_by_kind: Counter[str] = Counter()
        self.fail_on_call = fail_on_call

    def generate(self, requests, sampling):
        kind = requests[0].kind if requests else "none"
        self.calls_by_kind[kind] += 1
        if self.fail_on_call == (kind, self.calls_by_kind[kind]):
            raise EngineError("worker lost")
        self.seen.extend(r.request_id for r in requests)
        return super().generate(requests, sampling)


def test_counts_add_up_at_every_stage(tmp_path):
    cfg = fake_cfg(
        tmp_path,
        "personas.n=60",
        "engine.fake.malformed_judge_rate=0.2",
        "engine.fake.duplicate_prompt_rate=0.15",
        "engine.fake.missing_prefix_rate=0.1",
        "engine.fake.truncate_rate=0.05",
        "engine.fake.identical_response_rate=0.1",
    )
    result = run_synth(cfg)
    s = result.summary
    assert s["personas"]["rows_out"] == 60
    for stage in ("prompts", "responses", "pairs"):
        assert s[stage]["rows_in"] == s[stage]["rows_out"] + sum(s[stage]["drops"].values()), stage
    assert s["judgements"]["rows_out"] == s["judgements"]["rows_in"]  # invalid verdicts are kept
    assert s["prompts"]["rows_in"] == 60 and s["responses"]["rows_in"] == s["prompts"]["rows_out"]
    for reason in ("duplicate_exact", "no_prefix", "truncated"):
        assert s["prompts"]["drops"].get(reason, 0) > 0, reason
    assert 0 < s["prompts"]["repetition_rate"] < 0.5
    assert set(s["responses"]["drops"]) <= {"truncated", "identical", "empty"} and s["responses"]["drops"]
    d = s["judgements"]["diagnostics"]
    assert d["invalid_by_reason"]["invalid_verdict"] == d["judgements"] - d["valid_judgements"]
    assert s["pairs"]["rows_out"] == d["valid_judgements"]
    # The round folder holds the resolved config, its hash and a round manifest.
    assert storage.exists(storage.join(result.round_url, "resolved_config.yaml"))
    assert storage.read_json(storage.join(result.round_url, "manifest.json"))["stages"]["pairs"] == s["pairs"]
    # Dropped rows are kept for inspection, with their reason and raw text.
    dropped = storage.list_files(
        storage.join(result.round_url, "prompts", "_candidates", "_dropped"), "*.jsonl"
    )
    assert dropped and "raw_output" in storage.read_text(dropped[0])


def test_pairs_load_with_datasets_in_trl_format(tmp_path):
    import datasets

    result = run_synth(fake_cfg(tmp_path))
    ds = datasets.load_dataset("json", data_files=shards.data_files(result.pairs_url, "jsonl"), split="train")
    assert ds.num_rows == result.summary["pairs"]["rows_out"] > 0
    row = ds[0]
    assert row["prompt"][0]["role"] == "user" and row["chosen"][0]["role"] == "assistant"
    assert row["rejected"][0]["role"] == "assistant" and row["chosen"] != row["rejected"]
    for col in (
        "persona_id",
        "prompt_id",
        "chosen_response_id",
        "rejected_response_id",
        "raw_judge_output",
        "round",
        "config_hash",
    ):
        assert col in ds.column_names


def test_parquet_rounds(tmp_path):
    result = run_synth(fake_cfg(tmp_path, "run.format=parquet"))
    assert shards.data_files(result.pairs_url, "parquet")[0].endswith(".parquet")
    assert result.summary["pairs"]["rows_out"] > 0


def test_model_output_never_crashes_a_stage(tmp_path):
    cfg = fake_cfg(tmp_path, "engine.fake.malformed_judge_rate=1.0", "engine.fake.missing_prefix_rate=0.5")
    s = run_synth(cfg).summary
    assert s["judgements"]["diagnostics"]["parse_rate"] == 0.0
    assert s["pairs"]["rows_out"] == 0
    cfg = fake_cfg(tmp_path, "engine.fake.missing_prefix_rate=1.0", "run.round=2")
    s = run_synth(cfg).summary
    assert s["prompts"]["rows_out"] == 0 and s["pairs"]["rows_out"] == 0  # empty stages are fine


def test_crash_mid_stage_keeps_finished_shards_and_resumes(tmp_path):
    cfg = fake_cfg(tmp_path)  # 20 personas, shards of 5: 4 shards per stage
    crashing = CountingEngine(cfg, fail_on_call=("response", 3))
    with pytest.raises(EngineError, match="worker lost"):
        run_synth(cfg, EngineProvider(cfg, lambda: crashing))
    from sao_core.store.layout import round_url

    responses = stage_url(round_url(cfg), "responses")
    done = [shards.read_shard_manifest(responses, i) for i in range(4)]
    assert [d is not None for d in done] == [True, True, False, False]
    assert not storage.exists(storage.join(responses, "manifest.json"))  # the stage does not look finished
    kept = [shards.read_shard(responses, i, "jsonl")[0] for i in (0, 1)]

    again = CountingEngine(cfg)
    result = run_synth(cfg, EngineProvider(cfg, lambda: again))
    assert again.calls_by_kind["prompt"] == 0  # prompts were finished: not redone
    assert again.calls_by_kind["response"] == 2  # only the two unfinished shards
    assert [shards.read_shard(responses, i, "jsonl")[0] for i in (0, 1)] == kept  # finished shards intact
    assert result.summary["responses"]["rows_in"] == result.summary["prompts"]["rows_out"]


def test_unchanged_rerun_does_not_load_the_model(tmp_path):
    cfg = fake_cfg(tmp_path)
    run_synth(cfg)
    built: list[int] = []

    def build() -> FakeEngine:
        built.append(1)
        return FakeEngine(cfg.engine.fake)

    run_synth(cfg, EngineProvider(cfg, build))
    assert built == []


def test_gate_and_engine_patience_changes_reuse_the_finished_round(tmp_path):
    """Raising a timeout after a shard timed out, or lowering a gate after it failed, redoes nothing."""
    first = run_synth(fake_cfg(tmp_path))
    changed = fake_cfg(
        tmp_path,
        "engine.shard_timeout_s=60",
        "engine.max_retries=0",
        "engine.batch_size=3",
        "engine.fake.fail_calls=5",
        "pairing.min_pairs=1000",
        "judging.min_valid_rate=0.99",
    )
    built: list[int] = []

    def build() -> FakeEngine:
        built.append(1)
        return FakeEngine(changed.engine.fake)

    again = run_synth(changed, EngineProvider(changed, build))
    assert again.round_url == first.round_url
    assert built == []  # every shard of every stage was found finished: the model never loaded
    assert again.summary["pairs"]["rows_out"] == first.summary["pairs"]["rows_out"]


def test_changed_judging_redoes_only_judging(tmp_path):
    a = fake_cfg(tmp_path, "run.root=" + str(tmp_path / "a"))
    run_synth(a)
    # Copy the round to a config that differs only in judging: prompts and responses are reused.
    b = fake_cfg(tmp_path, "run.root=" + str(tmp_path / "a"), "judging.swap=true")
    import shutil

    from sao_core.store.layout import round_url

    shutil.copytree(round_url(a), round_url(b))
    engine = CountingEngine(b)
    s = run_synth(b, EngineProvider(b, lambda: engine)).summary
    assert engine.seen and all(i.count(":") == 2 for i in engine.seen)  # judge requests only
    assert s["judgements"]["diagnostics"]["swap_consistency"] is not None


def test_personas_are_disjoint_across_rounds_of_a_campaign(tmp_path):
    r1 = run_synth(fake_cfg(tmp_path, "run.round=1"))
    r2 = run_synth(fake_cfg(tmp_path, "run.round=2"))
    ids = [
        {r["persona_id"] for r in shards.read_stage_rows(stage_url(r.round_url, "personas"), "jsonl")}
        for r in (r1, r2)
    ]
    assert len(ids[0]) == len(ids[1]) == 20 and not ids[0] & ids[1]
    # Another campaign may reuse them.
    r3 = run_synth(fake_cfg(tmp_path, "run.round=2", "run.campaign=other"))
    assert r3.summary["personas"].get("rows_out") == 20


def test_zero_personas_is_a_clear_error(tmp_path):
    empty = tmp_path / "personas.jsonl"
    empty.write_text("")
    cfg = fake_cfg(tmp_path, "personas.source=file", f"personas.path={empty}")
    with pytest.raises(PersonaSourceError, match=r"personas\.jsonl"):
        run_synth(cfg)
    assert not list((tmp_path / "c").rglob("manifest.json"))  # nothing that looks complete
