"""Only what changes the output may name where it goes: the round folder, a stage's settings hash, the
model folder. Each launch-only key below is changed alone and must leave its hash as it was."""

from pathlib import Path

import pytest

from sao_core.store.layout import hash_config, load_config, round_url, stage_settings_hash
from sao_core.training import training_hash

TINY = str(Path(__file__).parents[2] / "configs" / "tiny.yaml")
STAGES = ("personas", "prompts", "responses", "judgements")


def tiny(*overrides: str):
    return load_config(TINY, list(overrides))


# Keys that change how the round's data is made, not what it is.
ROUND_LAUNCH_ONLY = [
    "engine.shard_timeout_s=60",
    "engine.max_retries=0",
    "engine.request_timeout_s=5",
    "engine.max_concurrency=64",
    "engine.python=/opt/vllm/bin/python",
    "engine.base_urls=[http://a:8000/v1, http://b:8000/v1]",
    "engine.api_key_env=OTHER_API_KEY",
    "engine.gpu_memory_utilization=0.5",
    "engine.enforce_eager=true",
    "engine.batch_size=3",  # the fake engine ignores it; vllm below
    "engine.fake.fail_calls=2",
    "pairing.min_pairs=1000",
    "judging.min_valid_rate=0.99",
    "fanout.mode=deployment",
    "training.learning_rate=0.5",
    "evaluation.n=3",
    "evaluation.max_tokens=64",
    "evaluation.temperature=0.7",
    "evaluation.judge_max_tokens=8",
]

# Keys that change the data: each must name another round folder.
ROUND_DATA = [
    "run.seed=1",
    "run.shard_size=5",
    "run.format=parquet",
    "model.path=org/other",
    "engine.dtype=bfloat16",
    "engine.max_model_len=1024",
    "engine.fake.truncate_rate=0.5",
    "personas.n=9",
    "prompts.temperature=0.9",
    "responses.k=3",
    "judging.swap=true",
    "judging.max_tokens=16",
    # The prompts stage drops prompts that overlap the evaluation set: which set it is changes the data.
    "evaluation.enabled=false",
    "evaluation.prompts=memory://eval/prompts.jsonl",
]


@pytest.mark.parametrize("override", ROUND_LAUNCH_ONLY)
def test_launch_only_keys_keep_the_round_folder_and_its_shards(override):
    base, changed = tiny(), tiny(override)
    assert changed != base  # the override did change the config
    assert round_url(changed) == round_url(base)
    for stage in STAGES:
        assert stage_settings_hash(changed, stage) == stage_settings_hash(base, stage), stage


@pytest.mark.parametrize("override", ROUND_DATA)
def test_keys_that_change_the_data_name_another_round_folder(override):
    assert hash_config(tiny(override)) != hash_config(tiny())


def test_judging_gate_leaves_judgements_but_judging_settings_redo_them():
    base = tiny()
    assert stage_settings_hash(tiny("judging.swap=true"), "judgements") != stage_settings_hash(
        base, "judgements"
    )
    assert stage_settings_hash(tiny("judging.swap=true"), "responses") == stage_settings_hash(
        base, "responses"
    )


def test_batch_size_names_the_folder_only_under_transformers():
    """transformers seeds each batch from its first request and pads to its longest prompt: the batch
    size changes the text. vLLM (max_num_seqs) and openai seed every request by itself."""
    hf = ("engine.name=transformers",)
    assert round_url(tiny(*hf, "engine.batch_size=3")) != round_url(tiny(*hf))
    for engine in ("vllm", "openai"):
        other = (f"engine.name={engine}", "engine.base_urls=[http://a:8000/v1]", "evaluation.enabled=false")
        assert round_url(tiny(*other, "engine.batch_size=3")) == round_url(tiny(*other))


# Keys that change how a training run is launched or kept, not what it learns.
TRAINING_LAUNCH_ONLY = [
    ["training.checkpoint_steps=7"],
    ["training.launcher=torchrun", "training.num_processes=2"],
    ["training.launcher=accelerate", "training.accelerate_config=deployments/accelerate/ddp.yaml"],
    ["training.per_device_batch_size=2"],
    ["training.gradient_checkpointing=true"],
    ["training.save_total_limit=5"],
    ["training.keep_checkpoints=true"],
    ["training.logging_steps=10"],
    ["training.deployment=sao-train/train"],
    ["engine.shard_timeout_s=60", "pairing.min_pairs=1000", "fanout.mode=deployment"],
]

TRAINING_LEARNS = [
    "training.learning_rate=0.5",
    "training.objective=dpo",
    "training.beta=2.0",
    "training.global_batch_size=4",
    "training.max_steps=3",
    "training.precision=bf16",
    "training.seed=1",
    "training.merge=true",
    "training.deepspeed=deployments/deepspeed/zero3.json",
    "training.lora.r=8",
    "model.path=org/other",
]


@pytest.mark.parametrize("overrides", TRAINING_LAUNCH_ONLY, ids=lambda o: o[0])
def test_launch_only_training_keys_keep_the_model_folder(overrides):
    base, changed = tiny(), tiny(*overrides)
    assert changed != base
    assert training_hash(changed) == training_hash(base)


@pytest.mark.parametrize("override", TRAINING_LEARNS)
def test_what_training_learns_names_another_model_folder(override):
    assert training_hash(tiny(override)) != training_hash(tiny())


def test_runs_sharing_a_round_folder_each_read_their_own_settings(tmp_path):
    # training and promotion are outside the round hash, so these two runs share one folder; both used to
    # read the settings back from its one resolved_config.yaml, which the later run overwrote: the first
    # trained with the second's beta and was judged by the second's rule.
    from tasks.cache import load_round_config
    from tasks.config import resolve_config

    root = f"run.root={tmp_path}"
    mild = ["training.beta=2.5", "promotion.min_win_rate_lower=0.55"]
    strict = ["training.beta=20", "promotion.min_win_rate_lower=0.7"]
    first = resolve_config.fn(TINY, [root, *mild])
    second = resolve_config.fn(TINY, [root, *strict])
    assert first["round_dir"] == second["round_dir"]  # one folder, its data shared
    assert first["config_url"] != second["config_url"]
    for ref, (beta, bar) in ((first, (2.5, 0.55)), (second, (20.0, 0.7))):
        cfg = load_round_config(ref["config_url"])
        assert (cfg.training.beta, cfg.promotion.min_win_rate_lower) == (beta, bar), ref["config_url"]
        assert cfg == tiny(root, *(mild if beta == 2.5 else strict))
    # A third run of the first's settings resumes it and reads the same file, unchanged.
    assert resolve_config.fn(TINY, [root, *mild])["config_url"] == first["config_url"]
    # The round's record of its data settings is still there for older tools and resumed rounds.
    record = load_round_config(f"{first['round_dir']}/resolved_config.yaml")
    assert hash_config(record) == first["config_hash"]
