"""Training without training: settings, pair checks, the SimPO formula, checkpoints, launch commands.

The runs themselves (tiny model, 2 processes, kill and resume, SmolLM2) are in tests/integration/.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from sao_core.config import TrainingConfig, build_config
from sao_core.errors import ConfigError, ModelNotFoundError, TrainingError
from sao_core.store import shards, storage
from sao_core.store.shards import ShardManifest
from sao_core.testing import build_tiny_tokenizer
from sao_core.training import training_hash
from sao_core.training.arguments import (
    build_peft_config,
    build_trl_config,
    gradient_accumulation_steps,
    trainer_class,
)
from sao_core.training.data import ROW_COLUMN, find_pair_files, load_pairs, prepare_pairs, repeated_rows
from sao_core.training.launch import build_launch_command, check_inputs, stream_command
from sao_core.training.outputs import check_run_identity, finished_manifest, last_checkpoint, run_identity
from sao_core.training.plots import plot_curves, read_train_log
from sao_core.training.run import load_model, load_tokenizer

ROOT = Path(__file__).parents[2]


def pair_row(i: int, answer: str = "Write a plan for the budget.") -> dict:
    return {
        "prompt": [{"role": "user", "content": f"How do I plan a budget {i}?"}],
        "chosen": [{"role": "assistant", "content": answer}],
        "rejected": [{"role": "assistant", "content": "the a of to"}],
        "persona_id": f"persona-{i}",
        "prompt_id": f"prompt-{i}",
        "chosen_response_id": f"prompt-{i}-r0",
        "rejected_response_id": f"prompt-{i}-r1",
        "raw_judge_output": "ranking: 1 > 2",
        "round": 1,
        "config_hash": "abc",
    }


def write_jsonl(path: Path, rows: list) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


# --- settings ----------------------------------------------------------------------------------------------


def test_defaults_are_the_papers_simpo_recipe():
    t = TrainingConfig()
    assert (t.objective, t.beta, t.simpo_gamma, t.learning_rate) == ("simpo", 10.0, 3.0, 1e-6)
    assert (t.lr_scheduler, t.warmup_ratio, t.epochs, t.global_batch_size) == ("cosine", 0.1, 1.0, 128)
    assert (t.max_length, t.max_prompt_length) == (2048, 1800)


@pytest.mark.parametrize(
    ("training", "message"),
    [
        ({"objective": "kto"}, "'training.objective': Input should be 'simpo', 'dpo' or 'orpo'"),
        ({"global_batch_size": 6, "per_device_batch_size": 4}, "must be a multiple of per_device_batch_size"),
        ({"max_length": 64, "max_prompt_length": 64}, "max_prompt_length (64) must be below"),
        ({"num_processes": 2}, "launcher 'inprocess' runs one process"),
        ({"lora": {"rank": 4}}, "unknown config key 'training.lora.rank'"),
    ],
)
def test_bad_training_settings_are_refused_with_the_key_named(training, message):
    with pytest.raises(ConfigError) as e:
        build_config({"training": training})
    assert message in str(e.value)


def test_gradient_accumulation_comes_from_the_global_batch():
    t = TrainingConfig(global_batch_size=128, per_device_batch_size=2)
    assert gradient_accumulation_steps(t, 1) == 64
    assert gradient_accumulation_steps(t, 4) == 16
    with pytest.raises(
        ConfigError, match=r"not a multiple of per_device_batch_size x processes \(2 x 3 = 6\)"
    ):
        gradient_accumulation_steps(t, 3)


def test_training_hash_ignores_how_a_run_is_launched_but_not_what_it_learns():
    base = build_config({})
    assert training_hash(base) == training_hash(
        build_config({"training": {"checkpoint_steps": 7, "logging_steps": 3}})
    )
    assert training_hash(base) != training_hash(build_config({"training": {"learning_rate": 2e-6}}))
    assert training_hash(base) != training_hash(build_config({"model": {"path": "org/other"}}))


def test_report_to_reaches_trl_and_leaves_the_training_hash_alone(tmp_path):
    # Where the logged steps are also sent does not change what is learned: a run of today's default
    # (none) keeps its model folder, and turning tensorboard on resumes it rather than training anew.
    base = build_config({})
    assert base.training.report_to == ()
    for report_to in (["tensorboard"], ["none"], ["tensorboard", "mlflow"]):
        assert training_hash(build_config({"training": {"report_to": report_to}})) == training_hash(base)
    t = TrainingConfig(precision="fp32", report_to=("tensorboard",))
    assert build_trl_config(t, str(tmp_path), 1, use_cpu=True).report_to == ["tensorboard"]
    none = TrainingConfig(precision="fp32", report_to=("none",))
    assert build_trl_config(none, str(tmp_path), 1, use_cpu=True).report_to == []


def test_a_reporter_without_its_package_or_beside_none_is_refused(tmp_path, monkeypatch):
    import importlib.util

    with pytest.raises(ConfigError, match=r"training\.report_to .*'none' beside a reporter"):
        build_config({"training": {"report_to": ["none", "wandb"]}})
    with pytest.raises(ConfigError, match=r"training\.report_to"):
        build_config({"training": {"report_to": ["comet"]}})
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    t = TrainingConfig(precision="fp32", report_to=("wandb",))
    with pytest.raises(ConfigError, match=r"training\.report_to names 'wandb', but .* wandb installed"):
        build_trl_config(t, str(tmp_path), 1, use_cpu=True)


@pytest.mark.tier1
def test_tensorboard_events_of_a_tiny_run_land_in_its_output(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sao_core.testing import build_tiny_llama
    from sao_core.training import train

    pairs = write_jsonl(
        tmp_path / "pairs" / "part-00000.jsonl", [pair_row(i, "x " * (1 + i)) for i in range(4)]
    )
    training = {
        "precision": "fp32",
        "global_batch_size": 2,
        "per_device_batch_size": 2,
        "max_length": 256,
        "max_prompt_length": 128,
        "max_steps": 2,
        "report_to": ["tensorboard"],
    }
    model = str(build_tiny_llama(tmp_path / "tiny"))
    out = tmp_path / "model"
    manifest = train(build_config({"model": {"path": model}, "training": training}), pairs, str(out))
    events = list((out / "logs").glob("events.out.tfevents.*"))
    assert events, sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    accumulator = EventAccumulator(str(out / "logs"))
    accumulator.Reload()
    losses = accumulator.Scalars("train/loss")
    assert [e.step for e in losses] == [1, 2] and manifest["steps"] == 2
    logged = json.loads((out / "train_log.json").read_text())["steps"]
    assert [round(e.value, 4) for e in losses] == [round(s["loss"], 4) for s in logged]


def test_simpo_trl_config_sets_every_setting_we_rely_on(tmp_path):
    t = TrainingConfig(precision="fp32", checkpoint_steps=7, max_steps=30, seed=5)
    args = build_trl_config(t, str(tmp_path), world_size=1, use_cpu=True)
    assert type(args).__name__ == "CPOConfig"
    assert (args.loss_type, args.beta, args.simpo_gamma, args.cpo_alpha, args.alpha) == (
        "simpo",
        10.0,
        3.0,
        0.0,
        0.0,
    )
    assert args.label_smoothing == 0.0 and args.disable_dropout is True
    assert (args.learning_rate, args.lr_scheduler_type.value, args.warmup_steps) == (1e-6, "cosine", 0.1)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (2, 64)
    assert (args.bf16, args.fp16, args.gradient_checkpointing) == (False, False, False)
    assert (args.max_length, args.max_steps, args.seed, args.data_seed) == (2048, 30, 5, 5)
    assert (args.save_steps, args.save_total_limit, args.save_only_model) == (7, 2, False)
    # One process here: no process group. Two ranks on CPU use gloo (tests/integration, manifest["backend"]).
    assert args.use_cpu is True and args.ddp_backend is None and args.report_to == []


def test_dpo_and_orpo_read_their_own_beta(tmp_path):
    dpo = build_trl_config(TrainingConfig(objective="dpo", precision="fp32"), str(tmp_path), 1, True)
    assert type(dpo).__name__ == "DPOConfig"
    assert (dpo.beta, dpo.loss_type, dpo.precompute_ref_log_probs, dpo.truncation_mode) == (
        0.01,
        ["sigmoid"],
        False,
        "keep_start",
    )
    orpo = build_trl_config(TrainingConfig(objective="orpo", precision="bf16"), str(tmp_path), 1, True)
    assert type(orpo).__name__ == "ORPOConfig" and orpo.beta == 0.1 and orpo.bf16 is True


def test_fp16_on_cpu_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="fp16' needs a GPU"):
        build_trl_config(TrainingConfig(precision="fp16"), str(tmp_path), 1, use_cpu=True)


def test_lora_section_becomes_a_peft_config():
    lora = build_peft_config(TrainingConfig())
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (16, 32, 0.05)
    assert set(lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    every = build_peft_config(TrainingConfig(lora={"target_modules": ("all-linear",)}))
    assert every.target_modules == "all-linear"
    assert build_peft_config(TrainingConfig(lora={"enabled": False})) is None


def test_unknown_objective_is_refused_even_past_the_config():
    # model_construct skips validation, as a hand-built config could.
    bad = TrainingConfig.model_construct(**{**TrainingConfig().model_dump(), "objective": "kto"})
    with pytest.raises(ConfigError, match=r"training\.objective 'kto' is unknown; allowed: simpo, dpo, orpo"):
        trainer_class("kto")
    with pytest.raises(ConfigError, match="'kto' is unknown"):
        build_trl_config(bad, "/tmp/x", 1, True)


# --- the SimPO formula (SAO.md step 6), hand-computed ------------------------------------------------------


def test_trl_simpo_loss_matches_the_formula_by_hand():
    import torch
    from trl.experimental.cpo import CPOTrainer

    # L = -log sigmoid(beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma), beta 10, gamma 3.
    # Pair 1: log pi(y_w) = -8 over 4 tokens, log pi(y_l) = -15 over 6 tokens:
    #   z = 10 * (-2.0) - 10 * (-2.5) - 3 = 2        L = log(1 + e^-2) = 0.126928
    # Pair 2: log pi(y_w) = -9 over 3 tokens, log pi(y_l) = -5 over 5 tokens:
    #   z = 10 * (-3.0) - 10 * (-1.0) - 3 = -23      L = log(1 + e^23) = 23.000000000103
    chosen_avg = torch.tensor([-8.0 / 4, -9.0 / 3])
    rejected_avg = torch.tensor([-15.0 / 6, -5.0 / 5])
    trainer = SimpleNamespace(
        beta=10.0,
        simpo_gamma=3.0,
        label_smoothing=0.0,
        alpha=0.0,
        loss_type="simpo",
        accelerator=SimpleNamespace(device=torch.device("cpu")),
    )
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(trainer, chosen_avg, rejected_avg)
    assert losses.tolist() == pytest.approx([0.126928011, 23.000000000103], abs=1e-6)
    assert math.log1p(math.exp(-2.0)) == pytest.approx(0.126928011, abs=1e-9)
    # The logged rewards are beta x the length-normalised log-probs: margins 5 and -20.
    assert (chosen_rewards - rejected_rewards).tolist() == pytest.approx([5.0, -20.0])


# --- pairs -------------------------------------------------------------------------------------------------


def test_pairs_folder_with_a_manifest_uses_its_shards(tmp_path):
    stage = str(tmp_path / "pairs")
    for index in range(2):
        manifest = ShardManifest(stage="pairs", shard=index, file="", sha256="", rows_out=0, rows_in=2)
        shards.write_shard(
            stage, index, [pair_row(2 * index), pair_row(2 * index + 1)], [], "jsonl", manifest
        )
        entries = [shards.read_shard_manifest(stage, i) for i in range(index + 1)]
    shards.write_stage_manifest(stage, "pairs", [e for e in entries if e])
    (tmp_path / "pairs" / "part-00099.jsonl").write_text("not listed in the manifest\n")
    assert [Path(f).name for f in find_pair_files(stage)] == ["part-00000.jsonl", "part-00001.jsonl"]
    ds, _, sha = load_pairs(stage)
    assert len(ds) == 4 and ds[ROW_COLUMN] == [0, 1, 2, 3] and len(sha) == 64
    assert ds["prompt_id"] == ["prompt-0", "prompt-1", "prompt-2", "prompt-3"]


def test_pairs_folder_without_manifest_globs_and_a_single_file_works(tmp_path):
    write_jsonl(tmp_path / "p" / "part-00000.jsonl", [pair_row(0)])
    write_jsonl(tmp_path / "p" / "part-00001.jsonl", [pair_row(1)])
    assert len(load_pairs(str(tmp_path / "p"))[0]) == 2
    single = write_jsonl(tmp_path / "one.jsonl", [pair_row(0), pair_row(1), pair_row(2)])
    assert len(load_pairs(single)[0]) == 3


def test_parquet_pairs_are_read(tmp_path):
    path = tmp_path / "p" / "part-00000.parquet"
    path.parent.mkdir()
    path.write_bytes(shards.encode_rows([pair_row(0), pair_row(1)], "parquet"))
    ds, _, _ = load_pairs(str(tmp_path / "p"))
    assert ds[0]["chosen"] == [{"role": "assistant", "content": "Write a plan for the budget."}]


def test_pairs_from_an_object_store_url(tmp_path):
    url = "memory://sao-training-test/pairs/part-00000.jsonl"
    storage.write_bytes(url, shards.encode_rows([pair_row(0), pair_row(1)], "jsonl"))
    assert len(load_pairs(url)[0]) == 2


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"part-00000.jsonl": ""}, "is empty: no rows in"),
        ({"part-00000.jsonl": '{"prompt": [}\n'}, "part-00000.jsonl: line 1 is not JSON"),
        ({"part-00000.jsonl": "[1, 2]\n"}, "has no column 'prompt', 'chosen', 'rejected'"),
    ],
)
def test_empty_and_malformed_pairs_are_named(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(TrainingError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_pairs(str(tmp_path))


def test_missing_pairs_folder_and_empty_folder_are_named(tmp_path):
    with pytest.raises(TrainingError, match="not found"):
        load_pairs(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainingError, match="holds no pair files"):
        load_pairs(str(tmp_path / "empty"))


def test_missing_column_is_named(tmp_path):
    rows = [{k: v for k, v in pair_row(i).items() if k != "rejected"} for i in range(2)]
    path = write_jsonl(tmp_path / "part-00000.jsonl", rows)
    with pytest.raises(TrainingError, match="has no column 'rejected'"):
        load_pairs(path)


def test_column_missing_from_one_shard_names_the_shards(tmp_path):
    write_jsonl(tmp_path / "part-00000.jsonl", [pair_row(0)])
    write_jsonl(tmp_path / "part-00001.jsonl", [{k: v for k, v in pair_row(1).items() if k != "chosen"}])
    with pytest.raises(TrainingError, match=r"part-00001.jsonl, line 1: column 'chosen' is missing"):
        load_pairs(str(tmp_path))


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("chosen", "just text", "column 'chosen' is not a non-empty list of messages"),
        ("chosen", [{"role": "user", "content": "x"}], "column 'chosen' has a message with role 'user'"),
        ("prompt", [{"role": "assistant", "content": "x"}], "column 'prompt' must end with a 'user' message"),
        ("rejected", [{"role": "assistant"}], "column 'rejected' has a message without a text 'content'"),
    ],
)
def test_malformed_rows_name_file_line_and_column(tmp_path, column, value, message):
    rows = [pair_row(0), pair_row(1), {**pair_row(2), column: value}]
    write_jsonl(tmp_path / "part-00000.jsonl", rows[:1])
    write_jsonl(tmp_path / "part-00001.jsonl", rows[1:])
    with pytest.raises(TrainingError) as e:
        load_pairs(str(tmp_path))
    assert message in str(e.value) and "part-00001.jsonl, line 2" in str(e.value)


def test_long_pairs_are_dropped_and_counted(tmp_path, tokenizer):
    rows = [pair_row(0), pair_row(1, answer="plan " * 300), pair_row(2)]
    path = write_jsonl(tmp_path / "part-00000.jsonl", rows)
    pairs = prepare_pairs(path, tokenizer, TrainingConfig(max_length=64, max_prompt_length=32))
    assert len(pairs.dataset) == 2 and pairs.rows_in == 3 and pairs.drops == {"too_long": 1}
    assert pairs.dataset[ROW_COLUMN] == [0, 2] and pairs.prompt_ids[2] == "prompt-2"
    assert pairs.dataset.column_names == ["prompt", "chosen", "rejected", ROW_COLUMN]
    assert all(t > 0 for t in pairs.tokens)


def test_pairs_all_longer_than_max_length_are_an_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "part-00000.jsonl", [pair_row(i, answer="plan " * 300) for i in range(3)])
    with pytest.raises(
        TrainingError, match=r"every one of the 3 pairs .* longer than training\.max_length=64"
    ):
        prepare_pairs(path, tokenizer, TrainingConfig(max_length=64, max_prompt_length=32))


def test_token_counts_follow_trls_sequences(tmp_path, tokenizer):
    # ChatML answer "x<|im_end|>\n": TRL's CPO appends one EOS (the text ends in "\n"), DPO does not.
    path = write_jsonl(tmp_path / "part-00000.jsonl", [pair_row(0)])
    row = pair_row(0)
    prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(row["prompt"] + row["chosen"], tokenize=False)
    full_rejected = tokenizer.apply_chat_template(row["prompt"] + row["rejected"], tokenize=False)
    n = len(tokenizer(full, add_special_tokens=False)["input_ids"])
    n_rejected = len(tokenizer(full_rejected, add_special_tokens=False)["input_ids"])
    simpo = prepare_pairs(path, tokenizer, TrainingConfig(max_length=512, max_prompt_length=256))
    assert simpo.tokens == [n + 1 + n_rejected + 1]
    assert len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) < n


# --- checks before any training -----------------------------------------------------------------------------


def test_missing_model_path_is_named_before_anything_loads(tmp_path):
    path = write_jsonl(tmp_path / "part-00000.jsonl", [pair_row(0)])
    missing = tmp_path / "no" / "model"
    cfg = build_config({"model": {"path": str(missing)}})
    with pytest.raises(ModelNotFoundError, match=f"model path '{missing}' does not exist"):
        check_inputs(cfg, path)


def test_start_adapter_that_is_missing_or_not_an_adapter_is_named(tmp_path):
    path = write_jsonl(tmp_path / "part-00000.jsonl", [pair_row(0)])
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "model" / "model.safetensors").write_text("")
    adapter = tmp_path / "round1" / "adapter"
    cfg = build_config({"model": {"path": str(tmp_path / "model"), "adapter": str(adapter)}})
    with pytest.raises(ModelNotFoundError, match=f"model.adapter: adapter path '{adapter}' does not exist"):
        check_inputs(cfg, path)
    adapter.mkdir(parents=True)
    (adapter / "adapter_model.safetensors").write_text("")
    with pytest.raises(
        ModelNotFoundError,
        match=rf"model.adapter: adapter folder {adapter} exists but is not a LoRA adapter: no adapter_config\.json$",
    ):
        check_inputs(cfg, path)


def test_model_revision_reaches_from_pretrained_for_a_hub_id_only(tmp_path, monkeypatch):
    import transformers

    calls = []

    def from_pretrained(path, **kwargs):
        calls.append((path, kwargs.get("revision")))
        return SimpleNamespace(chat_template="{{ messages }}", pad_token="<pad>")

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", from_pretrained)
    load_tokenizer("org/name", "abc123")
    load_model("org/name", revision="abc123")
    load_tokenizer(str(tmp_path), "abc123")  # a local folder has no revisions
    load_model(str(tmp_path), revision="abc123")
    assert calls == [("org/name", "abc123")] * 2 + [(str(tmp_path), None)] * 2


def test_missing_deepspeed_file_is_named(tmp_path):
    path = write_jsonl(tmp_path / "part-00000.jsonl", [pair_row(0)])
    cfg = build_config({"training": {"deepspeed": "deployments/deepspeed/nope.json"}})
    with pytest.raises(
        ConfigError, match=r"training.deepspeed: file 'deployments/deepspeed/nope.json' not found"
    ):
        check_inputs(cfg, path)


# --- outputs and checkpoints ------------------------------------------------------------------------------


def test_train_log_keeps_step_entries_and_plots_them():
    history = [
        {
            "loss": 0.69,
            "rewards/margins": 0.0,
            "rewards/accuracies": 0.5,
            "learning_rate": 1e-6,
            "step": 1,
            "epoch": 0.5,
        },
        {
            "loss": 0.6,
            "rewards/margins": 0.1,
            "rewards/accuracies": 1.0,
            "learning_rate": 5e-7,
            "step": 2,
            "epoch": 1.0,
        },
        {"train_runtime": 3.0, "train_loss": 0.65, "step": 2},
    ]
    steps = read_train_log(history)
    assert [s["step"] for s in steps] == [1, 2] and steps[1]["rewards/margins"] == 0.1
    png = plot_curves(steps, "dpo")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_last_checkpoint_skips_one_killed_while_saving(tmp_path):
    for step in (5, 10, 15):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-5" / "trainer_state.json").write_text(json.dumps({"global_step": 5}))
    (tmp_path / "checkpoint-10" / "trainer_state.json").write_text(json.dumps({"global_step": 10}))
    (tmp_path / "checkpoint-15" / "trainer_state.json").write_text('{"global_st')  # torn
    assert last_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    assert last_checkpoint(tmp_path / "none") is None


def test_a_run_recorded_under_the_old_params_hash_key_is_the_same_run(tmp_path):
    cfg = build_config({})
    identity = run_identity(cfg, "pairs-sha")
    old = {"params_hash": training_hash(cfg), "pairs_sha256": "pairs-sha", "model": cfg.model.path}
    storage.write_json(str(tmp_path / "run.json"), old)
    check_run_identity(str(tmp_path), identity, write=True)  # resumes: no error
    assert storage.read_json(str(tmp_path / "run.json")) == old
    storage.write_json(str(tmp_path / "manifest.json"), {"complete": True, "steps": 3, **old})
    assert finished_manifest(str(tmp_path), identity)["steps"] == 3
    with pytest.raises(TrainingError, match="holds checkpoints of another run"):
        check_run_identity(str(tmp_path), run_identity(cfg, "other-pairs"), write=False)


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("per_device", [1, 2, 4])
@pytest.mark.parametrize("rows", [1, 5, 8, 13])
def test_repeated_rows_are_what_accelerate_adds_to_even_the_ranks(rows, per_device, world_size):
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler, SequentialSampler

    # The Trainer's dataloader under several processes: accelerate's shards with even_batches=True.
    batches = BatchSampler(SequentialSampler(range(rows)), per_device, drop_last=False)
    seen = (
        [i for rank in range(world_size) for b in BatchSamplerShard(batches, world_size, rank) for i in b]
        if world_size > 1
        else [i for b in batches for i in b]
    )
    assert sorted(set(seen)) == list(range(rows))  # every row is trained
    assert repeated_rows(rows, per_device, world_size) == len(seen) - rows
    assert repeated_rows(rows, per_device, world_size, epochs=3.0) == 3 * (len(seen) - rows)
    # The repeats close an epoch: one cut short by max_steps has none of its own.
    assert repeated_rows(rows, per_device, world_size, epochs=2.5) == 2 * (len(seen) - rows)


# --- launching --------------------------------------------------------------------------------------------


def test_launch_commands_start_the_stage_module():
    stage = ["--config", "c.yaml", "--pairs", "p", "--output", "o"]
    torchrun = build_launch_command(TrainingConfig(launcher="torchrun", num_processes=2), stage, 29501)
    assert torchrun[1:3] == ["-m", "torch.distributed.run"] and "--nproc_per_node" in torchrun
    assert torchrun[torchrun.index("--master_port") + 1] == "29501"
    assert torchrun[-8:] == ["-m", "sao_core.training.rank", *stage]
    acc = build_launch_command(TrainingConfig(launcher="accelerate", num_processes=2), stage, 29502)
    assert acc[1:3] == ["-m", "accelerate.commands.launch"]
    assert acc[acc.index("--config_file") + 1] == str(ROOT / "deployments/accelerate/ddp.yaml")
    assert acc[acc.index("--num_processes") + 1] == "2"


def test_a_failed_command_raises_with_its_last_lines(capsys):
    code = "import sys\nfor i in range(60): print(f'line {i}')\nprint('rank 1: out of memory', file=sys.stderr)\nsys.exit(3)"
    with pytest.raises(TrainingError) as e:
        stream_command([sys.executable, "-c", code], {}, "torchrun", tail_lines=5)
    message = str(e.value)
    assert "torchrun exited with code 3" in message and "rank 1: out of memory" in message
    assert "line 59" in message and "line 10" not in message
    assert "line 10" in capsys.readouterr().out  # streamed as it ran


def test_deployment_files_load():
    for path in (ROOT / "deployments" / "accelerate").glob("*.yaml"):
        data = yaml.safe_load(path.read_text())
        assert data["distributed_type"] in {"MULTI_GPU", "DEEPSPEED"}, path
    zero3 = json.loads((ROOT / "deployments" / "deepspeed" / "zero3.json").read_text())
    assert zero3["zero_optimization"]["stage"] == 3
    assert zero3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    ds_yaml = yaml.safe_load((ROOT / "deployments" / "accelerate" / "zero3.yaml").read_text())
    assert (ROOT / ds_yaml["deepspeed_config"]["deepspeed_config_file"]).is_file()


def test_importing_the_training_modules_is_light():
    import subprocess
    import textwrap

    # Heavy libraries load inside the functions that need them; the library never reaches up to the
    # CLI, the stages, the orchestration or the test helpers.
    code = textwrap.dedent(
        """
        import importlib, pkgutil, sys
        import sao_core.training as package
        names = [m.name for m in pkgutil.iter_modules(package.__path__)]
        for name in names:
            importlib.import_module(f"sao_core.training.{name}")
        print(",".join(sorted(names)))
        upward = ("sao_core.stages", "sao_core.cli", "sao_core.testing", "prefect", "flows", "tasks")
        print(",".join(m for m in upward if m in sys.modules))
        import sao_core.training.rank
        heavy = ("torch", "transformers", "trl", "peft", "datasets", "matplotlib")
        print(",".join(m for m in heavy if m in sys.modules))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    submodules, upward, heavy = out.stdout.split("\n")[:3]
    assert submodules == "arguments,data,launch,outputs,plots,rank,run"
    assert upward == "" and heavy == ""
