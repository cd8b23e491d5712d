"""Every engine runs the trained policy when model.adapter is set, or refuses the config: the fake and
openai engines here (the vllm parent is in test_vllm_helpers.py; real adapters on vLLM, a `vllm serve`
and transformers are in tests/integration/test_adapters_engines.py).

The adapters here are folders with an adapter's file names and made-up bytes: the fake engine reads only
their content, the openai engine only names them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sao_core.config import EngineConfig, FakeEngineConfig, ModelConfig
from sao_core.engines import ChatRequest, Sampling, make_engine
from sao_core.engines.fake import FakeEngine
from sao_core.engines.openai import OpenAIEngine
from sao_core.errors import EngineError, ModelNotFoundError
from sao_core.store import storage
from sao_core.store.models import model_revision, resolve_adapter
from tests.stub_openai import StubServer, serve_runtime_lora

GREEDY = Sampling(temperature=0.0, top_p=1.0, max_tokens=64, seed=0)
ADAPTER_FILES = {"adapter_config.json": b'{"r": 4}', "adapter_model.safetensors": b"lora-round-1"}


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAO_CACHE", str(tmp_path / "cache"))


def write_adapter(url: str, weights: bytes = b"lora-round-1") -> str:
    for name, data in {**ADAPTER_FILES, "adapter_model.safetensors": weights}.items():
        storage.write_bytes(storage.join(url, name), data)
    return url


def requests() -> list[ChatRequest]:
    return [
        ChatRequest.user("p0", "Persona:\n\nA nurse.\n\nWrite a prompt.", kind="prompt"),
        ChatRequest.user("r0", "How do I plan a budget?", n=2, kind="response"),
        ChatRequest.user("j0", "<Response 1>a</Response 1><Response 2>bb</Response 2>", kind="judge"),
    ]


def texts(engine: Any) -> list[list[str]]:
    return [[c.text for c in row] for row in engine.generate(requests(), GREEDY)]


# --- fake ----------------------------------------------------------------------------------------------


def test_the_fake_engine_answers_as_its_adapter_and_names_it() -> None:
    cfg = FakeEngineConfig()
    url = write_adapter("memory://round_001/model/adapter")  # a trained round's output, fetched once
    base = FakeEngine(cfg, model="m", seed=0)
    policy = FakeEngine(cfg, model="m", seed=0, adapter=url)
    assert texts(policy) != texts(base)
    assert texts(FakeEngine(cfg, model="m", seed=0, adapter=url)) == texts(policy)  # deterministic
    assert texts(FakeEngine(cfg, model="m", seed=0)) == texts(base)  # no adapter: as before
    assert base.model_revision == "fake"
    assert policy.model_revision == "fake+adapter:" + model_revision(url, resolve_adapter(url))

    # The next round's adapter differs only in its weights (same size, same config): other text again.
    retrained = FakeEngine(
        cfg, model="m", seed=0, adapter=write_adapter("memory://round_002/a", b"lora-round-2")
    )
    assert texts(retrained) not in (texts(base), texts(policy))
    assert retrained.model_revision not in (base.model_revision, policy.model_revision)


def test_make_engine_gives_the_fake_engine_the_configured_adapter() -> None:
    url = write_adapter("memory://round_001/model/adapter")
    engine = EngineConfig(name="fake")
    policy = make_engine(engine, ModelConfig(path="m", adapter=url))
    assert texts(policy) == texts(FakeEngine(FakeEngineConfig(), model="m", seed=0, adapter=url))
    assert texts(policy) != texts(make_engine(engine, ModelConfig(path="m")))
    assert policy.model_revision == "fake+adapter:" + model_revision(url, resolve_adapter(url))


def test_the_fake_engine_refuses_an_adapter_that_is_not_one(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match=r"no adapter_config\.json"):
        FakeEngine(FakeEngineConfig(), adapter=str(tmp_path / "empty"))


# --- openai --------------------------------------------------------------------------------------------


def answer_with_model(body: dict[str, Any]) -> str:
    """The stub's answer names the model it was asked for, as a served adapter answers differently."""
    return f"{body['model']} says: {body['messages'][-1]['content'][:20]}"


def list_cards(stub: StubServer, cards: list[dict[str, Any]]) -> StubServer:
    """Make the stub's GET /models list these cards, as `vllm serve --enable-lora` lists a base model
    (`parent` null) and its adapters (`parent`: the base's name)."""
    handler = stub.httpd.RequestHandlerClass

    class Cards(handler):  # type: ignore[misc,valid-type]
        def do_GET(self) -> None:
            self._send(200, {"object": "list", "data": cards})

    stub.httpd.RequestHandlerClass = Cards
    return stub


@pytest.fixture
def served() -> Iterator[StubServer]:
    """A server with the base model `smollm2` and the adapter `policy` on it, as vLLM lists them."""
    stub = StubServer(answer=answer_with_model)
    list_cards(
        stub,
        [
            {"id": "smollm2", "object": "model", "root": "/models/smollm2", "parent": None},
            {"id": "policy", "object": "model", "root": "/adapters/round_001", "parent": "smollm2"},
        ],
    )
    yield stub
    stub.stop()


def openai_engine(url: str, served_name: str | None, adapter: str | None = None) -> Any:
    """The openai engine asking for `served_name`: the base's name, or the adapter's when there is one."""
    names = {"served_adapter_name" if adapter else "served_model_name": served_name}
    engine = EngineConfig(name="openai", base_urls=(url,), **names)
    return make_engine(engine, ModelConfig(path="bundled:smollm2-135m-instruct", adapter=adapter))


def test_the_openai_engine_asks_for_the_served_adapter(served: StubServer) -> None:
    url = write_adapter("memory://round_001/model/adapter")
    base = openai_engine(served.url, "smollm2")
    policy = openai_engine(served.url, "policy", adapter=url)
    assert isinstance(policy, OpenAIEngine)
    base_texts, policy_texts = texts(base), texts(policy)
    assert [c["model"] for c in served.calls] == ["smollm2"] * 4 + ["policy"] * 4
    assert policy_texts != base_texts and all(
        t.startswith("policy says:") for row in policy_texts for t in row
    )
    assert base.model_revision == "served:smollm2"
    adapter_revision = model_revision(url, resolve_adapter(url))
    assert policy.model_revision == f"served:bundled:smollm2-135m-instruct+adapter:{adapter_revision}"
    assert adapter_revision.startswith("sha256:")


def test_an_adapter_the_engine_cannot_read_is_named_by_its_served_name(served: StubServer) -> None:
    # The server may hold the only copy (a path on the GPU box): the manifest names what was asked for.
    policy = openai_engine(served.url, "policy", adapter="/srv/adapters/round_001")
    assert policy.model_revision == "served:bundled:smollm2-135m-instruct+adapter:served:policy"
    texts(policy)
    assert {c["model"] for c in served.calls} == {"policy"}


def test_an_adapter_no_server_was_started_with_is_loaded_at_run_time_and_unloaded() -> None:
    url = write_adapter("memory://round_001/model/adapter")
    stubs = [serve_runtime_lora(StubServer(model="smollm2", answer=answer_with_model)) for _ in range(2)]
    try:
        engine = EngineConfig(
            name="openai", base_urls=tuple(s.url for s in stubs), served_model_name="smollm2"
        )
        policy = make_engine(engine, ModelConfig(path="bundled:smollm2-135m-instruct", adapter=url))
        name = policy.served_model
        assert name.startswith("sao-lora-")
        body = {"lora_name": name, "lora_path": resolve_adapter(url)}
        assert [s.lora_log for s in stubs] == [[("load", body)], [("load", body)]]  # type: ignore[attr-defined]
        answers = texts(policy)
        assert all(t.startswith(f"{name} says:") for row in answers for t in row)
        assert {c["model"] for s in stubs for c in s.calls} == {name}
        policy.close()
        unload = ("unload", {"lora_name": name})
        assert [s.lora_log[-1] for s in stubs] == [unload, unload]  # type: ignore[attr-defined]
        # The base answers as itself from the same engine section, the adapter gone.
        base = make_engine(engine, ModelConfig(path="bundled:smollm2-135m-instruct"))
        assert texts(base)[0][0].startswith("smollm2 says:")
    finally:
        for s in stubs:
            s.stop()


def test_a_server_that_cannot_load_adapters_at_run_time_is_named() -> None:
    url = write_adapter("memory://round_001/model/adapter")
    stub = serve_runtime_lora(StubServer(model="smollm2", answer=answer_with_model), allowed=False)
    try:
        with pytest.raises(
            EngineError,
            match=r"cannot load adapters at run time \(HTTP 404.*VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora",
        ):
            make_engine(
                EngineConfig(name="openai", base_urls=(stub.url,)), ModelConfig(path="smollm2", adapter=url)
            )
        assert not stub.calls  # no chat call reached it
    finally:
        stub.stop()


def test_the_openai_engine_refuses_a_base_model_for_an_adapter_and_the_reverse(served: StubServer) -> None:
    url = write_adapter("memory://round_001/model/adapter")
    # The base model's name left over from the last round's config: the policy would be the base.
    with pytest.raises(EngineError, match=r"serves 'smollm2' as a base model, not as the adapter memory://"):
        openai_engine(served.url, "smollm2", adapter=url)
    # The adapter's name kept for the base model (the evaluation's reference): the base would be the policy.
    with pytest.raises(
        EngineError, match=r"serves 'policy' as a LoRA adapter of 'smollm2', but model\.adapter"
    ):
        openai_engine(served.url, "policy")
    assert not served.calls


def test_one_engine_section_reaches_the_base_and_its_adapter(served: StubServer) -> None:
    # What an evaluation does: the current model and the policy from the same engine settings.
    url = write_adapter("memory://round_001/model/adapter")
    engine = EngineConfig(
        name="openai", base_urls=(served.url,), served_model_name="smollm2", served_adapter_name="policy"
    )
    base = make_engine(engine, ModelConfig(path="bundled:smollm2-135m-instruct"))
    policy = make_engine(engine, ModelConfig(path="bundled:smollm2-135m-instruct", adapter=url))
    assert texts(base) != texts(policy)
    assert [c["model"] for c in served.calls] == ["smollm2"] * 4 + ["policy"] * 4


def test_a_server_that_lists_no_parents_is_trusted() -> None:
    stub = StubServer(model="policy", answer=answer_with_model)  # lists {"id": "policy"} only
    try:
        policy = openai_engine(stub.url, "policy", adapter=write_adapter("memory://round_001/a"))
        assert texts(policy)[1][0].startswith("policy says:")
    finally:
        stub.stop()
