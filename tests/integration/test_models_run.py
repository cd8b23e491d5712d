"""Real models through the real transformers engine: the tiny random Llama and the bundled SmolLM2."""

from pathlib import Path

import pytest

from sao_core.config import build_config
from sao_core.engines import ChatRequest, Sampling, make_engine
from sao_core.errors import ModelNotFoundError
from sao_core.stages.synth import run_synth
from sao_core.store import shards, storage
from sao_core.store.layout import load_config
from sao_core.testing import build_tiny_llama

ROOT = Path(__file__).parents[2]
pytestmark = pytest.mark.tier1


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


def test_transformers_engine_batches_and_reports_finish_reasons(tiny_model):
    cfg = build_config({"model": {"path": tiny_model}, "engine": {"batch_size": 3}})
    engine = make_engine(cfg.engine, cfg.model, seed=1)
    reqs = [ChatRequest.user(f"r{i}", "hello " * (i + 1), n=2) for i in range(4)]
    outs = engine.generate(reqs, Sampling(temperature=0.8, top_p=0.95, max_tokens=6))
    assert [len(o) for o in outs] == [2, 2, 2, 2]
    for o in outs:
        for c in o:
            assert c.finish_reason in {"stop", "length"} and c.completion_tokens <= 6 and c.prompt_tokens > 0
            assert c.finish_reason == "stop" or c.completion_tokens == 6
    # Same seed, same requests: same text (shard re-runs are reproducible).
    again = make_engine(cfg.engine, cfg.model, seed=1).generate(reqs, Sampling(0.8, 0.95, 6))
    assert [[c.text for c in o] for o in again] == [[c.text for c in o] for o in outs]
    assert engine.model_revision.startswith("sha256:")


def test_left_padding_does_not_change_greedy_output(tiny_model):
    cfg = build_config({"model": {"path": tiny_model}, "engine": {"batch_size": 4}})
    engine = make_engine(cfg.engine, cfg.model)
    reqs = [ChatRequest.user("a", "short"), ChatRequest.user("b", "a much longer prompt " * 5)]
    batched = engine.generate(reqs, Sampling(0.0, 1.0, 8))
    alone = [engine.generate([r], Sampling(0.0, 1.0, 8))[0] for r in reqs]
    assert [o[0].text for o in batched] == [o[0].text for o in alone]


def test_tiny_model_runs_all_four_stages(tmp_path, tiny_model):
    overrides = [f"run.root={tmp_path}", f"model.path={tiny_model}", "engine.name=transformers"]
    overrides += ["prompts.max_tokens=24", "responses.max_tokens=24"]
    cfg = load_config(str(ROOT / "configs/tiny.yaml"), overrides)
    result = run_synth(cfg)
    s = result.summary
    assert s["personas"]["rows_out"] == 8
    assert s["prompts"]["rows_in"] == 8 and s["prompts"]["engine"] == "transformers"
    # Random weights write noise: every drop is counted, nothing crashes, every stage has its manifest.
    assert s["prompts"]["rows_out"] + sum(s["prompts"]["drops"].values()) == 8
    assert s["prompts"]["completion_tokens"] > 0
    for stage in ("personas", "prompts", "responses", "judgements", "pairs"):
        assert storage.exists(storage.join(result.round_url, stage, "manifest.json"))


def test_tiny_model_judges_real_pairs(tmp_path, tiny_model):
    """Judging and pairing on real model output: the tiny model's own verdicts on two fixed answers."""
    from sao_core.method.judging import build_judge_requests, parse_judge_completions, parse_verdict
    from sao_core.method.pairing import select_pairs

    cfg = build_config({"model": {"path": tiny_model}, "engine": {"batch_size": 8}})
    engine = make_engine(cfg.engine, cfg.model)
    rows = [
        {
            "prompt_id": f"p{i}",
            "persona_id": "x",
            "prompt": question,
            "round": 1,
            "responses": [{"response_id": f"p{i}a", "text": a}, {"response_id": f"p{i}b", "text": b}],
        }
        for i, (question, a, b) in enumerate(
            [("Q?", "one", "two"), ("Name a colour.", "Blue.", "Red, I think."), ("2 + 2?", "4", "Four.")]
        )
    ]
    reqs = build_judge_requests(rows, swap=True)
    outs = engine.generate(reqs, Sampling(0.0, 1.0, 8))
    judged = parse_judge_completions(rows, outs, swap=True)
    assert len(judged) == 3 and all(len(j["comparisons"]) == 2 for j in judged)
    # Whatever random weights write, each output is kept on the comparison it answered, in request order.
    comparisons = [c for j in judged for c in j["comparisons"]]
    assert [c["raw_judge_output"] for c in comparisons] == [o[0].text for o in outs]
    assert [(c["response_1_id"], c["response_2_id"]) for c in comparisons] == [
        ids for i in range(3) for ids in ((f"p{i}a", f"p{i}b"), (f"p{i}b", f"p{i}a"))
    ]
    for j in judged:
        # Each verdict is the strict parser's reading of its own text, and the row follows the two
        # verdicts: an unreadable one makes it invalid, two that name different answers inconsistent.
        preferred = []
        for c in j["comparisons"]:
            v = parse_verdict(c["raw_judge_output"])
            assert (c["preferred_position"], c["error"]) == (v.preferred_position, v.error)
            position = v.preferred_position
            preferred.append(None if position is None else c[f"response_{position}_id"])
        if None in preferred:
            expected = (False, "invalid_verdict", None)
        elif preferred[0] != preferred[1]:
            expected = (False, "inconsistent_order", None)
        else:
            expected = (True, None, preferred[0])
        assert (j["valid"], j["invalid_reason"], j["chosen_response_id"]) == expected
    # Pairing keeps exactly the valid judgements and drops each other one with its reason.
    pairs, dropped = select_pairs(judged, rows, "config-hash")
    assert [p["prompt_id"] for p in pairs] == [j["prompt_id"] for j in judged if j["valid"]]
    assert [d["drop_reason"] for d in dropped] == [
        f"invalid_judgement:{j['invalid_reason']}" for j in judged if not j["valid"]
    ]


def test_missing_model_folder_is_named(tmp_path):
    cfg = build_config({"model": {"path": str(tmp_path / "nothing")}})
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        make_engine(cfg.engine, cfg.model)
    (tmp_path / "empty").mkdir()
    cfg = build_config({"model": {"path": str(tmp_path / "empty")}})
    with pytest.raises(ModelNotFoundError, match=r"exists but is not a Hugging Face model: no config\.json"):
        make_engine(cfg.engine, cfg.model)


def test_a_model_trained_into_s3_generates_from_its_url(tiny_model, tmp_path, s3_env, monkeypatch):
    """Evaluation after training: the round's full model is passed as model.path by its s3:// URL."""
    monkeypatch.setenv("SAO_CACHE", str(tmp_path / "cache"))
    url = f"{s3_env}/round_001/model/abc/full"
    for f in Path(tiny_model).iterdir():
        storage.write_bytes(f"{url}/{f.name}", f.read_bytes())
    reqs = [ChatRequest.user("a", "hello")]
    outs = {}
    for path in (url, tiny_model):
        cfg = build_config({"model": {"path": path}})
        engine = make_engine(cfg.engine, cfg.model, seed=1)
        outs[path] = (engine.generate(reqs, Sampling(0.0, 1.0, 6))[0][0].text, engine.model_revision)
    assert outs[url] == outs[tiny_model]  # same weights, same greedy text, same revision


@pytest.mark.usefixtures("smollm2")  # the recipe's model is the bundled one
def test_bundled_smollm2_four_stages_to_trl_pairs(tmp_path):
    """The bundled SmolLM2 on CPU, a handful of personas, pairs loaded with datasets in TRL's format."""
    import datasets

    cfg = load_config(
        str(ROOT / "configs/cpu-smollm2.yaml"),
        [f"run.root={tmp_path}", "personas.n=8", "run.shard_size=4", "prompts.max_tokens=64"],
    )
    result = run_synth(cfg)
    s = result.summary
    assert s["prompts"]["model_revision"].startswith("sha256:")
    assert s["prompts"]["rows_in"] == 8
    assert s["judgements"]["rows_in"] == s["responses"]["rows_out"]
    assert s["judgements"]["diagnostics"]["parse_rate"] > 0  # the recipe's judge prefill works
    # Every row is accounted for with a reason.
    for stage in ("prompts", "responses", "pairs"):
        assert s[stage]["rows_in"] == s[stage]["rows_out"] + sum(s[stage]["drops"].values())
    files = shards.data_files(result.pairs_url, "jsonl")
    assert len(files) == 2
    n_pairs = s["pairs"]["rows_out"]
    assert n_pairs >= 1, s
    ds = datasets.load_dataset("json", data_files=files, split="train")
    assert ds.num_rows == n_pairs
    row = ds[0]
    assert row["prompt"][0]["role"] == "user" and row["prompt"][0]["content"].startswith("As a")
    assert row["chosen"][0]["role"] == "assistant" and row["rejected"][0]["role"] == "assistant"
    assert row["chosen"][0]["content"] != row["rejected"][0]["content"]
