"""A trained LoRA adapter changes what every real engine says: transformers, the vllm engine (vLLM's LoRA
support, in its CPU build) and the openai engine against `vllm serve --enable-lora`.

The model is the tiny random Llama; the adapter is a PEFT LoRA on it whose B matrices start random
instead of zero (`init_lora_weights=False`), so, unlike a freshly initialised one, it moves the greedy
answers. Transformers with the adapter merged is the reference: vLLM's LoRA path must give its tokens,
and vLLM without the adapter the base model's. Two vLLM starts in all (one worker, one server), each
30-60 s on 2 cores. Skipped without the vLLM environment unless SAO_REQUIRE_VLLM=1 (conftest.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from sao_core.config import EngineConfig, LoraSection, ModelConfig
from sao_core.engines import ChatRequest, Sampling, make_engine
from sao_core.engines.provider import EngineProvider
from sao_core.engines.vllm import VLLMEngine
from sao_core.errors import EngineError
from sao_core.stages.no_model import run_personas
from sao_core.stages.runner import run_shard
from sao_core.store import storage
from sao_core.store.layout import load_config, prepare_round
from sao_core.store.models import model_revision, resolve_adapter
from sao_core.testing import build_tiny_llama

REPO = Path(__file__).resolve().parents[2]
GREEDY = Sampling(temperature=0.0, top_p=1.0, max_tokens=16, seed=0)
QUESTIONS = (
    "How do I plan a budget for a teacher?",
    "Write a recipe for a farmer.",
    "Rank the best answer to the user prompt.",
    "What is the best code for a python student?",
    "Give a travel plan for a nurse.",
    "Draft a data plan for an engineer.",
)
SERVED_BASE = "tiny"
SERVED_ADAPTER = "policy"

pytestmark = pytest.mark.tier1


def build_adapter(base: str, out: Path, rank: int = 4) -> str:
    """A LoRA adapter on the project's default target modules, with random (non-zero) B matrices."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    lora = LoraSection()
    config = LoraConfig(
        r=rank,
        lora_alpha=lora.alpha,
        target_modules=list(lora.target_modules),
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), config).save_pretrained(str(out))
    return str(out)


def chat_requests() -> list[ChatRequest]:
    prefilled = ChatRequest.user("p0", "Write a prompt for a teacher.", prefill="User prompt:")
    return [ChatRequest.user(f"q{i}", q) for i, q in enumerate(QUESTIONS)] + [prefilled]


def answers(engine_cfg: EngineConfig, model: ModelConfig) -> tuple[list[str], str]:
    """The greedy answers to chat_requests() and the engine's model_revision."""
    engine = make_engine(engine_cfg, model, seed=0)
    try:
        return [row[0].text for row in engine.generate(chat_requests(), GREEDY)], engine.model_revision
    finally:
        engine.close()


def same(ours: list[str], theirs: list[str]) -> int:
    """How many answers agree. The tiny model's text is mostly stray bytes: vLLM's incremental
    detokenizer holds back a trailing incomplete UTF-8 sequence that transformers' decode writes as
    U+FFFD, so trailing replacement characters do not count (the tokens are the same)."""
    return sum(a.rstrip("\ufffd") == b.rstrip("\ufffd") for a, b in zip(ours, theirs, strict=True))


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A model cache of the module's own: the adapter at a URL is fetched into it."""
    path = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAO_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(the tiny model's folder, a LoRA adapter's folder for it)."""
    root = tmp_path_factory.mktemp("tiny")
    base = build_tiny_llama(root / "model")
    return base, build_adapter(base, root / "adapter")


@pytest.fixture(scope="module")
def reference(tiny: tuple[str, str], cache: Path) -> dict[str, tuple[list[str], str]]:
    """Transformers' greedy answers and revision, without and with the adapter (merged into the model)."""
    base, adapter = tiny
    engine = EngineConfig(name="transformers", device="cpu")
    return {
        "base": answers(engine, ModelConfig(path=base)),
        "policy": answers(engine, ModelConfig(path=base, adapter=adapter)),
    }


def test_transformers_answers_as_its_adapter(tiny: tuple[str, str], reference: dict) -> None:
    adapter = tiny[1]
    (base_texts, base_revision), (policy_texts, policy_revision) = reference["base"], reference["policy"]
    assert same(policy_texts, base_texts) == 0, list(zip(base_texts, policy_texts, strict=True))
    assert policy_revision == f"{base_revision}+adapter:{model_revision(adapter, adapter)}"


@pytest.mark.vllm
def test_vllm_answers_as_its_adapter_through_lora(
    vllm_python: str, tiny: tuple[str, str], reference: dict, tmp_path: Path
) -> None:
    base, adapter = tiny
    # The adapter at a URL, as training hands it on: the parent fetches it, the worker gets the folder.
    url = "memory://round_001/model/adapter"
    for f in Path(adapter).iterdir():
        storage.write_bytes(storage.join(url, f.name), f.read_bytes())
    cfg = load_config(
        str(REPO / "configs" / "tiny.yaml"),
        [
            f"run.root={tmp_path / 'art'}",
            f"model.path={base}",
            f"model.adapter={url}",
            "engine.name=vllm",
            f"engine.python={vllm_python}",
            "engine.max_model_len=2048",
            "personas.n=2",
            "prompts.max_tokens=16",
        ],
    )
    engine = make_engine(cfg.engine, cfg.model, seed=0)
    assert isinstance(engine, VLLMEngine)
    engines = EngineProvider(cfg, factory=lambda: engine)
    try:
        texts = [row[0].text for row in engine.generate(chat_requests(), GREEDY)]
        round_dir = prepare_round(cfg)
        run_personas(cfg, round_dir)
        entry = run_shard("prompts", cfg, round_dir, 0, engines)  # the same worker
    finally:
        engines.close()
    assert engines.builds == 1

    # fp32 and greedy: vLLM's LoRA gives the merged model's tokens, bar a near-tie now and then.
    (base_texts, base_revision), (policy_texts, _) = reference["base"], reference["policy"]
    assert same(texts, policy_texts) >= len(texts) - 1, list(zip(policy_texts, texts, strict=True))
    assert same(texts, base_texts) == 0, list(zip(base_texts, texts, strict=True))
    assert texts[-1].startswith("User prompt:")
    adapter_revision = model_revision(url, resolve_adapter(url))
    assert engine.model_revision == f"{base_revision}+adapter:{adapter_revision}"
    assert entry.model_revision == engine.model_revision and entry.engine == "vllm"


class LoRAServer:
    """`vllm serve` of the tiny model with the adapter as SERVED_ADAPTER, in a session of its own."""

    def __init__(self, python: str, model: str, adapter: str, log_path: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        self.url = f"http://127.0.0.1:{port}/v1"
        self.log_path = log_path
        cmd = [
            str(Path(python).parent / "vllm"), "serve", model, "--host", "127.0.0.1", "--port", str(port),
            "--served-model-name", SERVED_BASE, "--enable-lora", "--lora-modules", f"{SERVED_ADAPTER}={adapter}",
            "--max-lora-rank", "8", "--dtype", "float32", "--max-model-len", "2048", "--enforce-eager",
            "--seed", "0",
        ]  # fmt: skip
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONUNBUFFERED": "1"}
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True,
            )  # fmt: skip

    def wait_healthy(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(self.url.removesuffix("/v1") + "/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.5)
        raise RuntimeError(f"vllm serve not healthy after {timeout}s:\n{self.log_tail()}")

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@pytest.mark.vllm
def test_openai_engine_asks_vllm_serve_for_the_adapter_by_its_served_name(
    vllm_python: str, tiny: tuple[str, str], reference: dict, tmp_path: Path
) -> None:
    base, adapter = tiny
    server = LoRAServer(vllm_python, base, adapter, tmp_path / "serve.log")
    try:
        server.wait_healthy()
        cards = {m["id"]: m for m in httpx.get(f"{server.url}/models").json()["data"]}
        assert cards[SERVED_BASE]["parent"] is None and cards[SERVED_ADAPTER]["parent"] == SERVED_BASE
        # One engine section reaches both: the base by its served name, the policy by the adapter's.
        served = EngineConfig(
            name="openai",
            base_urls=(server.url,),
            served_model_name=SERVED_BASE,
            served_adapter_name=SERVED_ADAPTER,
        )
        base_texts, base_revision = answers(served, ModelConfig(path=base))
        policy_texts, policy_revision = answers(served, ModelConfig(path=base, adapter=adapter))
        # The base model's served name for the policy: refused, never answered as the base.
        with pytest.raises(EngineError, match=rf"serves '{SERVED_BASE}' as a base model, not as the adapter"):
            make_engine(
                served.model_copy(update={"served_adapter_name": SERVED_BASE}),
                ModelConfig(path=base, adapter=adapter),
            )
    finally:
        server.kill()

    assert same(policy_texts, base_texts) == 0, list(zip(base_texts, policy_texts, strict=True))
    (ref_base, _), (ref_policy, _) = reference["base"], reference["policy"]
    assert same(base_texts, ref_base) >= len(ref_base) - 1, list(zip(ref_base, base_texts, strict=True))
    assert same(policy_texts, ref_policy) >= len(ref_policy) - 1, list(
        zip(ref_policy, policy_texts, strict=True)
    )
    assert base_revision == f"served:{SERVED_BASE}"
    assert policy_revision == f"served:{base}+adapter:{model_revision(adapter, adapter)}"
