import json

from sao_core import storage
from sao_core.config import build_config
from sao_core.engines.fake import FakeEngine
from sao_core.evaluation import evaluate_policy, load_eval_prompts
from sao_core.stages.runner import EngineProvider


def test_bundled_prompts():
    rows = load_eval_prompts("builtin", 100)
    assert len(rows) == 16 and len({r["id"] for r in rows}) == 16 and all(r["prompt"] for r in rows)


def test_both_orders_judged_and_outcomes_follow_the_judge():
    # The fake judge prefers the longer answer whatever its position, so both orders always agree:
    # every prompt is a win or a loss, decided by which policy answered at more length.
    cfg = build_config({"engine": {"name": "fake"}, "evaluation": {"n": 8}})
    policy = EngineProvider(cfg, lambda: FakeEngine(cfg.engine.fake, seed=1))
    base = EngineProvider(cfg, lambda: FakeEngine(cfg.engine.fake, seed=0))
    m = evaluate_policy(cfg, policy, base, "memory://eval-test")
    rows = [json.loads(line) for line in storage.read_text("memory://eval-test/results.jsonl").splitlines()]
    assert m["prompts"] == 8 and m["ties"] == 0 and m["invalid"] == 0 and m["wins"] + m["losses"] == 8
    for r in rows:
        longer_new = len(r["new"]) >= len(r["base"])
        assert r["outcome"] == ("win" if longer_new else "loss")
    assert m["win_rate"] == m["wins"] / 8
    assert storage.read_json("memory://eval-test/manifest.json") == m
