"""Training in child processes on CPU: 2 ranks under `accelerate launch` (gloo), a failing rank, and a
run killed with SIGKILL mid-way that resumes from its last checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sao_core.config import build_config, config_to_yaml
from sao_core.errors import TrainingError
from sao_core.testing import build_tiny_llama
from sao_core.training import train
from sao_core.training.launch import stream_command
from sao_core.training.outputs import last_checkpoint

pytestmark = pytest.mark.tier1
ROOT = Path(__file__).parents[2]


def pair_row(i: int) -> dict:
    return {
        "prompt": [{"role": "user", "content": f"What should the nurse {i} plan?"}],
        "chosen": [{"role": "assistant", "content": "A budget plan with data." * (1 + i % 2)}],
        "rejected": [{"role": "assistant", "content": "the a of"}],
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
        "per_device_batch_size": 1,
        "max_length": 256,
        "max_prompt_length": 128,
        **training,
    }
    return build_config({"model": {"path": model}, "training": settings})


def test_two_gloo_ranks_train_different_rows_into_one_model(tiny_model, pairs_dir, tmp_path, capsys):
    cfg = tiny_config(tiny_model, launcher="accelerate", num_processes=2, max_steps=4)
    manifest = train(cfg, pairs_dir, str(tmp_path / "model"))
    out = capsys.readouterr().out
    assert "accelerate.commands.launch" in out and "step 4/4" in out  # the children's lines were streamed
    assert manifest["world_size"] == 2 and manifest["backend"] == "gloo"
    assert manifest["gradient_accumulation_steps"] == 1 and manifest["steps"] == 4
    ranks = json.loads((tmp_path / "model" / "ranks.json").read_text())
    assert [r["rank"] for r in ranks] == [0, 1]
    rows0, rows1 = set(ranks[0]["rows"]), set(ranks[1]["rows"])
    assert len(ranks[0]["rows"]) == len(ranks[1]["rows"]) == 4  # one row per rank per step
    assert rows0.isdisjoint(rows1) and rows0 | rows1 == {f"prompt-{i}" for i in range(8)}
    assert ranks[0]["trainable_sha256"] == ranks[1]["trainable_sha256"]  # one model, not two
    assert manifest["tokens"] == ranks[0]["tokens"] + ranks[1]["tokens"]

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model), tmp_path / "model" / "adapter"
    )
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())


def test_a_failing_rank_fails_the_launch_with_its_last_lines(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(
        textwrap.dedent("""
        import os, sys
        rank = int(os.environ["RANK"])
        print(f"rank {rank} started")
        if rank == 1:
            print("rank 1: pairs shard unreadable", file=sys.stderr)
            sys.exit(3)
        """)
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "0",
        str(script),
    ]
    with pytest.raises(TrainingError) as e:
        stream_command(cmd, dict(os.environ), "torchrun")
    assert "torchrun exited with code" in str(e.value) and "rank 1: pairs shard unreadable" in str(e.value)


def test_killed_run_resumes_from_its_last_checkpoint(tiny_model, pairs_dir, tmp_path, capsys):
    cfg = tiny_config(
        tiny_model, per_device_batch_size=1, global_batch_size=1, max_steps=12, checkpoint_steps=3
    )
    config = tmp_path / "round.yaml"
    config.write_text(config_to_yaml(cfg))
    out = tmp_path / "model"
    # The real entry point, with each step slowed down so the kill lands mid-run.
    runner = tmp_path / "slow_stage.py"
    runner.write_text(
        textwrap.dedent("""
        import os, runpy, sys, time
        import transformers
        step = transformers.Trainer.training_step
        def slow(self, *args, **kwargs):
            time.sleep(float(os.environ.get("STEP_SLEEP", "0")))
            return step(self, *args, **kwargs)
        transformers.Trainer.training_step = slow
        sys.argv = ["sao_core.training.rank", *sys.argv[1:]]
        runpy.run_module("sao_core.training.rank", run_name="__main__")
        """)
    )
    cmd = [sys.executable, str(runner), "--config", str(config), "--pairs", pairs_dir, "--output", str(out)]
    env = dict(os.environ, STEP_SLEEP="0.2", PYTHONUNBUFFERED="1")
    log_file = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while last_checkpoint(out / "checkpoints") is None:
        assert proc.poll() is None, (tmp_path / "first.log").read_text()
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log_file.close()
    killed_at = last_checkpoint(out / "checkpoints")
    assert killed_at is not None and not (out / "manifest.json").exists()
    step = int(killed_at.name.split("-")[1])
    assert 3 <= step < 12

    again = subprocess.run(
        cmd, env=dict(env, STEP_SLEEP="0"), cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resuming from checkpoint-{step} (step {step})" in again.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["resumed_from"] == f"checkpoint-{step}" and manifest["steps"] == 12
    assert manifest["resumed_from_step"] == step
    assert manifest["ranks"][0]["rows"] == 12  # every row trained, those before the kill too
    assert f"step {step + 1}/12" in again.stdout and f"step {step}/12" not in again.stdout  # not redone
    log = json.loads((out / "train_log.json").read_text())
    assert [s["step"] for s in log["steps"]] == list(range(1, 13))

    assert train(cfg, pairs_dir, str(out)) == manifest
    assert "already trained (12 steps): nothing to do" in capsys.readouterr().out
