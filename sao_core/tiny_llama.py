"""A tiny random Llama chat model built locally in about a second, no download: `bundled:tiny-random-llama`.

    path = build_tiny_llama("/tmp/tiny")      # a Hugging Face folder: config, safetensors, tokenizer
    cfg.model.path = path                      # or model.path: bundled:tiny-random-llama (configs/tiny.yaml)

Head size is 32 (vLLM refuses smaller heads). The tokenizer is a byte-level BPE trained here on the
project's own templates, so it round-trips any text, and carries a ChatML chat template.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _corpus() -> list[str]:
    from sao_core.method.judging import JUDGE_TEMPLATE
    from sao_core.method.prompts import PROMPT_TEMPLATE

    words = (
        "the a of to and in is for on with as you your prompt user response answer rank best worst "
        "teacher nurse engineer farmer student writer budget plan code data python recipe travel "
        "ranking 1 2 > : . , ? ! ' \" 0 3 4 5 6 7 8 9"
    )
    return [PROMPT_TEMPLATE, JUDGE_TEMPLATE, words, "User prompt: How do I plan a budget?", "ranking: 1 > 2"]


def build_tiny_tokenizer(vocab_size: int = 512) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_llama(
    path: str | Path,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    max_position_embeddings: int = 2048,
) -> str:
    """Write a random-weight Llama chat model (head size hidden/heads >= 32) to `path`; return it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if hidden_size // num_heads < 32:
        raise ValueError("head size (hidden_size / num_heads) must be >= 32 for vLLM")
    path = Path(path)
    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
