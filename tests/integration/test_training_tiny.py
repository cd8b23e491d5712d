"""Real training runs on the tiny random Llama, in this process: DPO's first loss, SimPO on a fixed batch
against the formula, adapter vs base weights, ORPO, full fine-tune and merge, no-redo, S3 output + resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from sao_core.campaign.round_report import format_round_report
from sao_core.config import build_config
from sao_core.errors import TrainingError
from sao_core.store import storage
from sao_core.testing import build_tiny_llama
from sao_core.training import train
from sao_core.training.data import ROW_COLUMN
from sao_core.training.run import prepare_training

pytestmark = pytest.mark.tier1


def pair_row(i: int) -> dict:
    return {
        "prompt": [{"role": "user", "content": f"How do I plan a budget for the teacher {i}?"}],
        "chosen": [
            {"role": "assistant", "content": "Write the plan, then the data, then the budget." * (1 + i % 2)}
        ],
        "rejected": [{"role": "assistant", "content": "the a of to " * (1 + i % 3)}],
        "persona_id": f"persona-{i}",
        "prompt_id": f"prompt-{i}",
        "chosen_response_id": f"prompt-{i}-r0",
        "rejected_response_id": f"prompt-{i}-r1",
        "raw_judge_output": "ranking: 1 > 2",
        "round": 1,
        "config_hash": "abc",
    }


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    (folder / "part-00000.jsonl").write_text("".join(json.dumps(pair_row(i)) + "\n" for i in range(8)))
    return str(folder)


def tiny_config(model: str, **training):
    settings = {
        "precision": "fp32",
        "learning_rate": 1e-3,
        "global_batch_size": 2,
        "per_device_batch_size": 2,
        "max_length": 256,
        "max_prompt_length": 128,
        "max_steps": 2,
        "checkpoint_steps": 50,
        **training,
    }
    return build_config({"model": {"path": model}, "training": settings})


def test_first_dpo_loss_is_ln2_and_outputs_are_written(tiny_model, pairs_dir, tmp_path):
    # With LoRA (B = 0 at start) the policy is its own reference, so the first DPO loss is ln 2.
    manifest = train(tiny_config(tiny_model, objective="dpo"), pairs_dir, str(tmp_path / "model"))
    log = json.loads((tmp_path / "model" / "train_log.json").read_text())
    first = log["steps"][0]
    assert abs(first["loss"] - math.log(2)) < 1e-3
    assert first["step"] == 1 and "rewards/margins" in first and "rewards/accuracies" in first
    assert [s["step"] for s in log["steps"]] == [1, 2]
    assert manifest["objective"] == "dpo" and manifest["steps"] == 2 and manifest["complete"] is True
    assert manifest["tokens"] > 0 and manifest["tokens_per_s"] > 0 and manifest["rows"] == 8
    assert manifest["ranks"][0]["rows"] == 4  # 2 steps x global batch 2, seen through DPO's collator
    assert manifest["rows_repeated"] == manifest["rows_repeated_per_epoch"] == 0  # one process repeats none
    assert (tmp_path / "model" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "model" / "train_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "model" / "checkpoints").exists()  # dropped once the model is written
    assert json.loads((tmp_path / "model" / "manifest.json").read_text()) == manifest
    report = format_round_report(str(tmp_path), {}, {**manifest, "output": str(tmp_path / "model")})
    assert f"- final loss: {manifest['final_loss']}\n" in report and manifest["final_loss"] > 0
    assert "rows repeated" not in report


def test_simpo_loss_on_a_fixed_batch_equals_the_formula(tiny_model, pairs_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = tiny_config(tiny_model, objective="simpo")
    setup = prepare_training(cfg, pairs_dir, str(tmp_path))
    trainer = setup.trainer
    examples = [dict(trainer.train_dataset[i]) for i in (0, 1, 2)]
    rows = [pair_row(e[ROW_COLUMN]) for e in examples]
    batch = trainer._prepare_inputs(trainer.data_collator(examples))
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, batch).item()

    # By hand: the base model (the LoRA adapter starts at zero) scores each answer token after the
    # chat-templated prompt; SimPO averages the answer's log-probs (TRL appends the EOS the templated
    # answer lacks) and L = -log sigmoid(beta * (avg_w - avg_l) - gamma), averaged over the batch.
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    beta, gamma = cfg.training.beta, cfg.training.simpo_gamma

    def average_logprob(prompt: list, answer: list) -> float:
        prompt_text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full_text = tok.apply_chat_template(prompt + answer, tokenize=False)
        prompt_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
        full_ids = tok(full_text, add_special_tokens=False)["input_ids"]
        assert full_ids[: len(prompt_ids)] == prompt_ids and prompt_ids[0] == tok.bos_token_id
        answer_ids = full_ids[len(prompt_ids) :]
        if answer_ids[-1] != tok.eos_token_id:
            answer_ids.append(tok.eos_token_id)
        ids = torch.tensor([prompt_ids + answer_ids])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
        total = sum(logprobs[len(prompt_ids) - 1 + k, t].item() for k, t in enumerate(answer_ids))
        return total / len(answer_ids)

    losses = []
    for row in rows:
        z = beta * (
            average_logprob(row["prompt"], row["chosen"]) - average_logprob(row["prompt"], row["rejected"])
        )
        z -= gamma
        losses.append(math.log1p(math.exp(-z)) if z > -30 else -z)
    assert trl_loss == pytest.approx(sum(losses) / len(losses), abs=1e-5)


def test_adapter_weights_change_and_base_weights_do_not(tiny_model, pairs_dir, tmp_path):
    import torch

    setup = prepare_training(
        tiny_config(tiny_model, objective="simpo", max_steps=3), pairs_dir, str(tmp_path)
    )
    model = setup.trainer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    setup.trainer.train()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    for name, param in model.named_parameters():
        changed = not torch.equal(before[name], param.detach())
        assert changed == (name in trained), name
    assert len(setup.trainer.rows_seen) == 6  # 3 steps x global batch 2


@pytest.mark.parametrize("steps", [1, 2])
def test_a_run_of_one_or_two_steps_still_trains(tiny_model, pairs_dir, tmp_path, steps):
    # training.warmup_ratio 0.1 of 1 or 2 steps is one warmup step, which transformers runs at rate 0.
    import torch

    setup = prepare_training(tiny_config(tiny_model, max_steps=steps), pairs_dir, str(tmp_path))
    model = setup.trainer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    setup.trainer.train()
    moved = [n for n, p in model.named_parameters() if n in before and not torch.equal(before[n], p.detach())]
    assert moved, "no trained weight moved"
    assert setup.trainer.warmup_steps == steps - 1


def test_orpo_trains_and_logs_reward_metrics(tiny_model, pairs_dir, tmp_path):
    manifest = train(tiny_config(tiny_model, objective="orpo", max_steps=1), pairs_dir, str(tmp_path / "m"))
    steps = json.loads((tmp_path / "m" / "train_log.json").read_text())["steps"]
    assert manifest["objective"] == "orpo"
    assert {"loss", "rewards/margins", "rewards/accuracies"} <= set(steps[0])


def test_full_fine_tune_and_merged_lora_write_loadable_models(tiny_model, pairs_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    full = train(
        tiny_config(tiny_model, max_steps=1, lora={"enabled": False}), pairs_dir, str(tmp_path / "full")
    )
    assert full["adapter"] is None and full["full_model"] == "full"
    merged = train(tiny_config(tiny_model, max_steps=1, merge=True), pairs_dir, str(tmp_path / "merged"))
    assert merged["adapter"] == "adapter" and merged["full_model"] == "full"
    for folder in (tmp_path / "full" / "full", tmp_path / "merged" / "full"):
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert not any("lora" in n for n, _ in model.named_parameters())


def test_round_two_starts_from_round_ones_adapter(tiny_model, pairs_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    train(tiny_config(tiny_model, max_steps=2, learning_rate=5e-2), pairs_dir, str(tmp_path / "round1"))
    adapter = str(tmp_path / "round1" / "adapter")
    cfg = build_config(
        {
            **tiny_config(tiny_model, objective="dpo", max_steps=1).model_dump(),
            "model": {"path": tiny_model, "adapter": adapter},
        }
    )
    setup = prepare_training(cfg, pairs_dir, str(tmp_path / "round2"))
    policy = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model), adapter
    ).merge_and_unload()
    start = setup.trainer.model.get_base_model()
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert any(not torch.allclose(base.get_parameter(n), p) for n, p in policy.named_parameters())
    for name, param in policy.named_parameters():
        assert torch.allclose(start.get_parameter(name), param), name  # M_1 = base + round 1's adapter
    setup.trainer.train()
    # DPO's reference is the starting policy M_1 (the new adapter starts at zero): first loss ln 2.
    assert abs(setup.trainer.state.log_history[0]["loss"] - math.log(2)) < 1e-3


def test_a_round_trains_from_a_model_and_an_adapter_at_s3_urls(
    tiny_model, pairs_dir, tmp_path, s3_env, monkeypatch
):
    """What round t+1 gets from round t: the base model and the trained adapter, both by s3:// URL."""
    from sao_core.store.models import model_revision

    monkeypatch.setenv("SAO_CACHE", str(tmp_path / "cache"))
    base_url = f"{s3_env}/base"
    for f in Path(tiny_model).iterdir():
        storage.write_bytes(f"{base_url}/{f.name}", f.read_bytes())
    round1 = f"{s3_env}/round_001/model"
    train(tiny_config(base_url, max_steps=1), pairs_dir, round1)
    cfg = build_config(
        {
            **tiny_config(base_url, objective="dpo", max_steps=1).model_dump(),
            "model": {"path": base_url, "adapter": f"{round1}/adapter"},
        }
    )
    manifest = train(cfg, pairs_dir, str(tmp_path / "round2"))
    assert manifest["steps"] == 1
    assert manifest["model_revision"] == model_revision(tiny_model, tiny_model)  # the same weights
    fetched = sorted(p.name for p in (tmp_path / "cache" / "models" / "fetched").iterdir() if p.is_dir())
    assert len(fetched) == 2  # the base model and round 1's adapter, copied into the model cache


def test_a_finished_run_is_not_redone_and_other_settings_are_refused(tiny_model, pairs_dir, tmp_path, capsys):
    out = str(tmp_path / "model")
    first = train(tiny_config(tiny_model, max_steps=1), pairs_dir, out)
    capsys.readouterr()
    # A launch-only setting (checkpoint interval) changed: still the same, finished run.
    again = train(tiny_config(tiny_model, max_steps=1, checkpoint_steps=9), pairs_dir, out)
    assert again == first and "already trained" in capsys.readouterr().out
    with pytest.raises(TrainingError, match="already holds a model trained from other settings or pairs"):
        train(tiny_config(tiny_model, max_steps=1, learning_rate=5e-4), pairs_dir, out)


def test_s3_output_uploads_checkpoints_and_a_fresh_machine_resumes_from_them(
    tiny_model, pairs_dir, tmp_path, s3_env, monkeypatch
):
    monkeypatch.setenv("SAO_CACHE", str(tmp_path / "cache-a"))
    pairs_url = f"{s3_env}/round/pairs/part-00000.jsonl"
    storage.write_bytes(pairs_url, (Path(pairs_dir) / "part-00000.jsonl").read_bytes())
    out = f"{s3_env}/round/model"
    cfg = tiny_config(tiny_model, max_steps=2, checkpoint_steps=1, keep_checkpoints=True)
    first = train(cfg, pairs_url, out)
    assert first["resumed_from"] is None
    names = {
        u.rstrip("/").rsplit("/", 1)[-1] for u in storage.list_files(f"{out}/checkpoints", "checkpoint-*")
    }
    assert names == {"checkpoint-1", "checkpoint-2"}
    for name in ("adapter/adapter_model.safetensors", "train_log.json", "train_curves.png", "manifest.json"):
        assert storage.exists(f"{out}/{name}"), name

    # As if killed after checkpoint-1 and restarted on another machine (empty staging folder): the run
    # downloads checkpoint-1 from the bucket and trains step 2 only.
    storage.remove(f"{out}/manifest.json")
    storage.remove(f"{out}/checkpoints/checkpoint-2", recursive=True)
    monkeypatch.setenv("SAO_CACHE", str(tmp_path / "cache-b"))
    second = train(cfg, pairs_url, out)
    assert second["resumed_from"] == "checkpoint-1" and second["steps"] == 2
    assert second["resumed_from_step"] == 1 and second["rows_counted_from_start"] is True
    assert (
        second["ranks"][0]["rows"] == first["ranks"][0]["rows"] == 4
    )  # step 1's rows come from checkpoint-1
    log = storage.read_json(f"{out}/train_log.json")
    assert [s["step"] for s in log["steps"]] == [1, 2]


def test_sao_train_command_runs_in_process(tiny_model, pairs_dir, tmp_path, capsys):
    import yaml

    from flows.cli import main

    config = tmp_path / "round.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tiny_model).model_dump(mode="json")))
    out = tmp_path / "model"
    code = main(
        [
            "train",
            "--config",
            str(config),
            "--pairs",
            pairs_dir,
            "--output",
            str(out),
            "--set",
            "training.max_steps=1",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0 and "[sao-train] step 1/1" in printed
    summary = json.loads(printed.strip().splitlines()[-1])
    assert summary["steps"] == 1 and summary["adapter"] == "adapter"
    assert (out / "manifest.json").is_file()
