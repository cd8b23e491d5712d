import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from sao_core.config import RoundConfig, build_config, config_to_yaml
from sao_core.errors import ConfigError
from sao_core.store.layout import hash_config, load_config, round_url

CONFIGS = sorted((Path(__file__).parents[2] / "configs").rglob("*.yaml"))


def test_configs_folder_is_not_empty():
    names = {p.name for p in CONFIGS}
    assert {"tiny.yaml", "cpu-smollm2.yaml", "paper-gemma2-9b.yaml", "paper-llama3-8b.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_file_loads(path):
    cfg = load_config(str(path))
    assert isinstance(cfg, RoundConfig)
    # Round-trips through its own YAML to the same hash.
    again = build_config(__import__("yaml").safe_load(config_to_yaml(cfg)))
    assert hash_config(again) == hash_config(cfg)


@pytest.mark.parametrize("name", ["paper-gemma2-9b.yaml", "paper-llama3-8b.yaml"])
def test_paper_recipes_hold_the_papers_settings(name):
    cfg = load_config(str(Path(__file__).parents[2] / "configs" / name))
    assert cfg.personas.n == 60_000
    assert cfg.prompts.temperature == cfg.responses.temperature == 0.6
    assert cfg.training.objective == "simpo"
    assert (cfg.training.beta, cfg.training.simpo_gamma, cfg.training.learning_rate) == (10.0, 3.0, 1e-6)
    assert cfg.engine.name == "vllm"
    assert cfg.judging.swap is False


def test_unknown_key_names_the_key_and_the_allowed_ones():
    with pytest.raises(ConfigError) as e:
        build_config({"judging": {"swp": True}})
    msg = str(e.value)
    assert "'judging.swp'" in msg and "did you mean 'judging.swap'" in msg
    assert "swap" in msg and "min_valid_rate" in msg


def test_unknown_top_level_section():
    with pytest.raises(
        ConfigError, match=r"unknown config key 'judge'.*allowed keys in the top level: run, model"
    ):
        build_config({"judge": {}})


def test_mistyped_value_names_the_key():
    with pytest.raises(ConfigError, match=r"'responses\.k'"):
        build_config({"responses": {"k": 1}})
    with pytest.raises(ConfigError, match=r"'engine\.name'"):
        build_config({"engine": {"name": "llamacpp"}})


def test_overrides_parse_yaml_values_and_nest():
    cfg = build_config({}, ["judging.swap=true", "personas.n=5", "engine.base_urls=[http://a, http://b]"])
    assert cfg.judging.swap is True and cfg.personas.n == 5
    assert cfg.engine.base_urls == ("http://a", "http://b")


def test_override_of_unknown_key_is_refused():
    with pytest.raises(ConfigError, match=r"'personas\.count'"):
        build_config({}, ["personas.count=3"])
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        build_config({}, ["personas.n"])


def test_section_given_a_scalar():
    with pytest.raises(ConfigError, match="'judging' is a section"):
        build_config({"judging": 3})


def test_config_is_frozen():
    cfg = build_config({})
    with pytest.raises(ValidationError):
        cfg.judging.swap = True  # type: ignore[misc]


def test_file_persona_source_needs_a_path():
    with pytest.raises(ConfigError, match=r"personas\.path"):
        build_config({"personas": {"source": "file"}})


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(str(bad))


def test_load_from_fsspec_url():
    import fsspec

    with fsspec.open("memory://cfgs/r.yaml", "w") as f:
        f.write("personas:\n  n: 3\n")
    assert load_config("memory://cfgs/r.yaml").personas.n == 3


def test_hash_changes_with_content_and_round_url_has_layout():
    a, b = build_config({}), build_config({}, ["judging.swap=true"])
    assert hash_config(a) != hash_config(b)
    assert hash_config(a) == hash_config(build_config({}))
    assert round_url(a) == f"{os.path.abspath('artifacts')}/default/round_001-{hash_config(a)}"
    assert round_url(build_config({}, ["run.root=s3://b/p"])).startswith("s3://b/p/default/round_001-")


def test_round_hash_ignores_where_artifacts_live():
    a = build_config({}, ["run.root=/tmp/x"])
    b = build_config({}, ["run.root=s3://bucket/y"])
    assert hash_config(a) == hash_config(b)
    assert hash_config(a) != hash_config(build_config({}, ["run.seed=1"]))


def test_round_hash_leaves_training_to_its_own_hash():
    a, b = build_config({}), build_config({}, ["training.learning_rate=0.001"])
    assert hash_config(a) == hash_config(b) and round_url(a) == round_url(b)
    assert hash_config(a.training) != hash_config(b.training)


def test_a_served_engine_evaluates_a_lora_policy_but_not_full_weights():
    served = ["engine.name=openai", "engine.base_urls=[http://127.0.0.1:8000/v1]"]
    # A LoRA policy is loaded into the running servers at run time (engines/openai.py).
    assert build_config(None, overrides=served).evaluation.engine is None
    full = [*served, "training.lora.enabled=false"]
    with pytest.raises(ConfigError, match=r"set evaluation\.engine to an engine that loads models"):
        build_config(None, overrides=full)
    with pytest.raises(ConfigError, match=r"evaluation\.engine"):
        build_config(None, overrides=[*full, "evaluation.engine={name: openai, base_urls: [http://h:1/v1]}"])
    cfg = build_config(None, overrides=[*full, "evaluation.engine={name: vllm}"])
    assert (cfg.engine.name, cfg.evaluation.engine.name) == ("openai", "vllm")
    assert build_config(None, overrides=[*full, "evaluation.enabled=false"]).evaluation.engine is None


def test_a_home_relative_root_names_one_place_for_rounds_records_and_lock(tmp_path, monkeypatch):
    # run.root=~/sao-art: the rounds once went to ./~/sao-art while the campaign records and lock expanded
    # `~`, so every nightly run found no decided round and planned "round 1" again.
    from sao_core.campaign.ledger import campaign_url
    from sao_core.store.locks import campaign_lock_url

    home, elsewhere = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    elsewhere.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(elsewhere)
    cfg = build_config({}, ["run.root=~/sao-art", "run.campaign=nightly"])
    campaign = f"{home}/sao-art/nightly"
    assert round_url(cfg) == f"{campaign}/round_001-{hash_config(cfg)}"
    assert campaign_url("~/sao-art", "nightly") == campaign
    assert campaign_lock_url("~/sao-art/", "nightly") == f"{campaign}/_lock.json"
    relative = build_config({}, ["run.root=art/"])
    assert round_url(relative).startswith(f"{elsewhere}/art/default/round_001-")
