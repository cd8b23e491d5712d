"""The bundled SmolLM2-135M-Instruct: a few pairs, LoRA, two SimPO steps; the adapter loads with PEFT and
generates."""

from __future__ import annotations

import json

import pytest

from sao_core.config import build_config
from sao_core.training import train

pytestmark = pytest.mark.tier1

PAIRS = [
    (
        "How do I plan a weekly food budget?",
        "List fixed costs, set a weekly cap, and track receipts.",
        "Food.",
    ),
    (
        "Give me one tip for learning Python.",
        "Write a small script every day, such as a budget tracker.",
        "Python is a snake.",
    ),
    (
        "How should a nurse prepare for a night shift?",
        "Sleep in the afternoon, eat a light meal, and hydrate.",
        "Just go.",
    ),
    (
        "What is a good first step to write a novel?",
        "Outline the main character's goal and the obstacle in one page.",
        "Type.",
    ),
]


def test_smollm2_lora_adapter_loads_with_peft_and_generates(smollm2, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pairs = tmp_path / "pairs" / "part-00000.jsonl"
    pairs.parent.mkdir()
    rows = [
        {
            "prompt": [{"role": "user", "content": p}],
            "chosen": [{"role": "assistant", "content": c}],
            "rejected": [{"role": "assistant", "content": r}],
            "prompt_id": f"prompt-{i}",
        }
        for i, (p, c, r) in enumerate(PAIRS)
    ]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = build_config(
        {
            "model": {"path": "bundled:smollm2-135m-instruct"},
            "training": {
                "objective": "simpo",
                "precision": "fp32",
                "learning_rate": 1e-4,
                "global_batch_size": 1,
                "per_device_batch_size": 1,
                "max_length": 256,
                "max_prompt_length": 128,
                "max_steps": 2,
                "lora": {"r": 4, "alpha": 8},
            },
        }
    )
    manifest = train(cfg, str(pairs.parent), str(tmp_path / "model"))
    assert manifest["steps"] == 2 and manifest["rows"] == 4 and manifest["ranks"][0]["rows"] == 2

    adapter = tmp_path / "model" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2), adapter).eval()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Give me one budgeting tip."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert out.shape[1] > inputs["input_ids"].shape[1] and text.strip()
