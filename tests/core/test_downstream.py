"""The pure parts of sao_core.evaluation.downstream: the bundled task files, data-file resolution, lm-eval result
parsing, and the "no task down more than X points" comparison. No model, no lm-eval import.

    .venv/bin/python -m pytest -q tests/core/test_downstream.py
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sao_core.evaluation.downstream import (
    BUNDLED_TASKS,
    DownstreamError,
    compare_downstream,
    parse_results,
    resolve_data_files,
    task_folders,
)

BUNDLED_NAMES = ("sao_arith", "sao_capitals")


def test_import_is_cheap():
    """lm_eval (and with it torch, datasets) is imported inside the functions, not by the module."""
    code = "import sys, sao_core.evaluation.downstream; print(sorted(m for m in ('lm_eval', 'torch', 'datasets') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", BUNDLED_NAMES)
def test_bundled_task_file_and_its_data(name: str):
    cfg = yaml.safe_load((BUNDLED_TASKS / f"{name}.yaml").read_text())
    assert cfg["task"] == name
    assert cfg["output_type"] == "multiple_choice"
    assert cfg["dataset_path"] == "json"
    assert cfg["dataset_kwargs"]["data_files"] == {"test": f"{name}.jsonl"}
    assert {m["metric"] for m in cfg["metric_list"]} == {"acc", "acc_norm"}
    rows = [json.loads(line) for line in (BUNDLED_TASKS / f"{name}.jsonl").read_text().splitlines()]
    assert len(rows) == 20
    assert len({r["id"] for r in rows}) == 20
    for row in rows:
        assert set(row) == {"id", "question", "choices", "answer"}, row["id"]
        assert len(row["choices"]) == 4 and len(set(row["choices"])) == 4, row["id"]
        assert row["answer"] in range(4), row["id"]
    # The right answer sits at each position equally often: chance is exactly 0.25.
    assert sorted(r["answer"] for r in rows) == [0] * 5 + [1] * 5 + [2] * 5 + [3] * 5


def test_bundled_arithmetic_answers_are_right():
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "x": lambda a, b: a * b, "/": lambda a, b: a / b}
    for line in (BUNDLED_TASKS / "sao_arith.jsonl").read_text().splitlines():
        row = json.loads(line)
        words = row["question"].removeprefix("What is ").removesuffix("?").split()
        if words[:2] == ["half", "of"]:
            value = int(words[2]) / 2
        elif words[1:] == ["squared"]:
            value = int(words[0]) ** 2
        elif words[0].startswith("("):  # (a + b) x c
            value = ops[words[3]](ops[words[1]](int(words[0][1:]), int(words[2][:-1])), int(words[4]))
        elif len(words) == 5 and words[3] == "x":  # a + b x c: the product first
            value = ops[words[1]](int(words[0]), int(words[2]) * int(words[4]))
        else:
            value = int(words[0])
            for op, operand in zip(words[1::2], words[2::2], strict=True):
                value = ops[op](value, int(operand))
        assert value == int(value), row["id"]
        assert row["choices"][row["answer"]] == str(int(value)), row["id"]


def test_bundled_task_data_resolves_to_the_files_next_to_the_yaml():
    for name in BUNDLED_NAMES:
        path = BUNDLED_TASKS / f"{name}.yaml"
        cfg = resolve_data_files(yaml.safe_load(path.read_text()), path)
        assert cfg["dataset_kwargs"]["data_files"] == {
            "test": str((BUNDLED_TASKS / f"{name}.jsonl").resolve())
        }


def test_task_folders(tmp_path: Path):
    assert task_folders(None) == [BUNDLED_TASKS]
    assert task_folders(str(tmp_path)) == [BUNDLED_TASKS, tmp_path.resolve()]
    with pytest.raises(DownstreamError, match=r"include_path .*missing.* is not a folder"):
        task_folders(str(tmp_path / "missing"))


def _task(data_files) -> dict:
    return {"task": "mine", "dataset_path": "json", "dataset_kwargs": {"data_files": data_files}}


@pytest.mark.parametrize(
    ("data_files", "expected"),
    [
        ("a.jsonl", "{d}/a.jsonl"),
        (["a.jsonl", "sub/b.jsonl"], ["{d}/a.jsonl", "{d}/sub/b.jsonl"]),
        (
            {"test": "a.jsonl", "train": ["sub/b.jsonl"]},
            {"test": "{d}/a.jsonl", "train": ["{d}/sub/b.jsonl"]},
        ),
        ({"test": "{d}/a.jsonl"}, {"test": "{d}/a.jsonl"}),  # already absolute
        ({"test": "hf://datasets/org/set/x.jsonl"}, {"test": "hf://datasets/org/set/x.jsonl"}),  # a URL
        ({"test": "../up.jsonl"}, {"test": "{up}/up.jsonl"}),
    ],
    ids=["path", "list", "splits", "absolute", "url", "parent"],
)
def test_resolve_data_files(tmp_path: Path, data_files, expected):
    folder = tmp_path / "tasks"
    (folder / "sub").mkdir(parents=True)
    for file in (folder / "a.jsonl", folder / "sub" / "b.jsonl", tmp_path / "up.jsonl"):
        file.write_text("{}\n")

    def fill(value):
        if isinstance(value, str):
            return value.format(d=folder.resolve(), up=tmp_path.resolve())
        if isinstance(value, list):
            return [fill(v) for v in value]
        return {k: fill(v) for k, v in value.items()}

    given = _task(fill(data_files))
    before = json.dumps(given)
    out = resolve_data_files(given, folder / "mine.yaml")
    assert out["dataset_kwargs"]["data_files"] == fill(expected)
    assert json.dumps(given) == before, "the config given must not be changed"
    assert out["task"] == "mine"


def test_resolve_data_files_names_the_task_and_the_missing_file(tmp_path: Path):
    with pytest.raises(DownstreamError) as e:
        resolve_data_files(_task({"test": "nowhere.jsonl"}), tmp_path / "mine.yaml")
    message = str(e.value)
    assert "'mine'" in message
    assert str(tmp_path / "nowhere.jsonl") in message
    assert "dataset_kwargs.data_files.test" in message


def test_resolve_data_files_refuses_a_malformed_entry(tmp_path: Path):
    with pytest.raises(DownstreamError, match=r"'mine'.*data_files.test.*must be a path"):
        resolve_data_files(_task({"test": 3}), tmp_path / "mine.yaml")


def test_resolve_data_files_leaves_hub_tasks_alone(tmp_path: Path):
    cfg = {"task": "arc_like", "dataset_path": "allenai/ai2_arc", "dataset_name": "ARC-Easy"}
    assert resolve_data_files(cfg, tmp_path / "x.yaml") == cfg


# The shape of simple_evaluate's output in lm-eval 0.4.13 (a real run on the tiny model, limit 5, with a
# group over two tasks), plus a filtered metric, an "N/A" stderr and a NaN to cover the odd cases.
RAW = {
    "results": {
        "sao_arith": {
            "name": "sao_arith",
            "alias": "sao_arith",
            "sample_len": 5,
            "acc,none": 0.0,
            "acc_stderr,none": 0.0,
            "acc_norm,none": 0.2,
            "acc_norm_stderr,none": 0.2,
        },
        "sao_capitals": {
            "name": "sao_capitals",
            "alias": "sao_capitals",
            "sample_len": 5,
            "acc,none": 0.2,
            "acc_stderr,none": "N/A",
            "acc_norm,none": float("nan"),
            "acc_norm_stderr,none": 0.2,
        },
        "both": {
            "alias": "both",
            "name": "both",
            "sample_len": 10,
            "acc,none": 0.1,
            "acc_stderr,none": 0.1,
            "sample_count": {"acc,none": 10},
        },
        "gsm_like": {
            "alias": "gsm_like",
            "sample_len": 4,
            "exact_match,strict-match": 0.25,
            "exact_match_stderr,strict-match": 0.25,
            "exact_match,flexible-extract": 0.5,
            "exact_match_stderr,flexible-extract": 0.28867513459481287,
            "word_perplexity,none": 12.5,
            "word_perplexity_stderr,none": "N/A",
        },
    },
    "groups": {"both": {"alias": "both", "acc,none": 0.1}},
    "group_subtasks": {"both": ["sao_arith", "sao_capitals"]},
    "n-samples": {
        "sao_arith": {"original": 20, "effective": 5},
        "sao_capitals": {"original": 20, "effective": 5},
        "gsm_like": {"original": 4, "effective": 4},
    },
    "higher_is_better": {
        "both": {"acc": True, "acc_norm": True},
        "sao_arith": {"acc": True, "acc_norm": True},
        "sao_capitals": {"acc": True, "acc_norm": True},
        "gsm_like": {"exact_match": True, "word_perplexity": False},
    },
    "n-shot": {"both": 0, "sao_arith": 0, "sao_capitals": 0, "gsm_like": 5},
    "lm_eval_version": "0.4.13",
}


def test_parse_results():
    out = parse_results(RAW)
    assert list(out) == ["sao_arith", "sao_capitals", "both", "gsm_like"]
    assert out["sao_arith"] == {
        "n_samples": 5,
        "n_available": 20,
        "num_fewshot": 0,
        "metrics": {
            "acc": {"value": 0.0, "stderr": 0.0, "higher_is_better": True},
            "acc_norm": {"value": 0.2, "stderr": 0.2, "higher_is_better": True},
        },
    }
    capitals = out["sao_capitals"]["metrics"]
    assert capitals["acc"] == {"value": 0.2, "stderr": None, "higher_is_better": True}  # "N/A"
    assert capitals["acc_norm"]["value"] is None  # NaN
    assert out["both"]["n_samples"] == 10
    assert out["both"]["n_available"] is None
    assert out["both"]["subtasks"] == ["sao_arith", "sao_capitals"]
    assert set(out["both"]["metrics"]) == {"acc"}
    gsm = out["gsm_like"]
    assert gsm["num_fewshot"] == 5
    assert set(gsm["metrics"]) == {
        "exact_match,strict-match",
        "exact_match,flexible-extract",
        "word_perplexity",
    }
    assert math.isclose(gsm["metrics"]["exact_match,flexible-extract"]["stderr"], 0.28867513459481287)
    assert gsm["metrics"]["word_perplexity"] == {"value": 12.5, "stderr": None, "higher_is_better": False}
    json.dumps(out, allow_nan=False)  # plain JSON: no NaN, no lm-eval objects


def test_parse_results_of_nothing():
    assert parse_results({}) == {}


def run(*tasks: tuple[str, int, dict[str, float]], lower: tuple[str, ...] = ()) -> dict:
    """A run_downstream-shaped result: (task, n_samples, {metric: value})."""
    return {
        "lm_eval_version": "0.4.13",
        "tasks": {
            task: {
                "n_samples": n,
                "metrics": {
                    m: {"value": v, "stderr": None, "higher_is_better": m not in lower}
                    for m, v in metrics.items()
                },
            }
            for task, n, metrics in tasks
        },
    }


BASE = run(("sao_arith", 40, {"acc": 0.625, "acc_norm": 0.5}), ("sao_capitals", 20, {"acc": 0.65}))


@pytest.mark.parametrize(
    ("candidate", "max_drop", "expected"),
    [
        (BASE, 0.0, []),
        (
            run(("sao_arith", 40, {"acc": 0.55, "acc_norm": 0.5}), ("sao_capitals", 20, {"acc": 0.65})),
            5.0,
            ["sao_arith acc fell 7.5 points (62.5 -> 55.0), more than 5.0"],
        ),
        # 0.65 -> 0.60 is 5.000000000000004 points in floating point: exactly the limit passes.
        (
            run(("sao_arith", 40, {"acc": 0.625, "acc_norm": 0.5}), ("sao_capitals", 20, {"acc": 0.6})),
            5.0,
            [],
        ),
        (
            run(("sao_arith", 40, {"acc": 0.625, "acc_norm": 0.5}), ("sao_capitals", 20, {"acc": 0.6})),
            4.9,
            ["sao_capitals acc fell 5.0 points (65.0 -> 60.0), more than 4.9"],
        ),
        # Gains never fail; an extra task in the candidate is not compared.
        (
            run(
                ("sao_arith", 40, {"acc": 0.9, "acc_norm": 0.9}),
                ("sao_capitals", 20, {"acc": 1.0}),
                ("extra", 5, {"acc": 0.0}),
            ),
            0.0,
            [],
        ),
        (
            run(("sao_arith", 40, {"acc": 0.0, "acc_norm": 0.0}), ("sao_capitals", 20, {"acc": 0.0})),
            10.0,
            [
                "sao_arith acc fell 62.5 points (62.5 -> 0.0), more than 10.0",
                "sao_arith acc_norm fell 50.0 points (50.0 -> 0.0), more than 10.0",
                "sao_capitals acc fell 65.0 points (65.0 -> 0.0), more than 10.0",
            ],
        ),
        (
            run(("sao_arith", 40, {"acc": 0.625, "acc_norm": 0.5})),
            5.0,
            ["sao_capitals is missing from the candidate's results"],
        ),
        (
            run(("sao_arith", 40, {"acc": 0.625}), ("sao_capitals", 20, {"acc": 0.65})),
            5.0,
            ["sao_arith acc_norm is missing from the candidate's results"],
        ),
        (
            run(("sao_arith", 39, {"acc": 0.625, "acc_norm": 0.5}), ("sao_capitals", 20, {"acc": 0.65})),
            5.0,
            ["sao_arith was scored on 39 questions, the baseline on 40: the scores are not comparable"],
        ),
        (
            run(("sao_arith", 40, {"acc": None, "acc_norm": 0.5}), ("sao_capitals", 20, {"acc": 0.65})),
            5.0,
            ["sao_arith acc has no value (baseline 0.625, candidate None)"],
        ),
    ],
    ids=[
        "same",
        "drop-7.5",
        "drop-exactly-at-limit",
        "drop-just-over-limit",
        "gains",
        "all-down",
        "task-missing",
        "metric-missing",
        "other-sample-count",
        "no-value",
    ],
)
def test_compare_downstream(candidate: dict, max_drop: float, expected: list[str]):
    assert compare_downstream(candidate, BASE, max_drop) == expected


def test_compare_downstream_lower_is_better_and_unscaled_metrics():
    base = run(
        ("t", 10, {"error_rate": 0.10, "word_perplexity": 12.0}), lower=("error_rate", "word_perplexity")
    )
    worse = run(
        ("t", 10, {"error_rate": 0.20, "word_perplexity": 99.0}), lower=("error_rate", "word_perplexity")
    )
    better = run(
        ("t", 10, {"error_rate": 0.0, "word_perplexity": 1.5}), lower=("error_rate", "word_perplexity")
    )
    # A rise of a lower-is-better metric is the loss; perplexity has no 0-1 scale and is not compared.
    assert compare_downstream(worse, base, 5.0) == [
        "t error_rate rose 10.0 points (10.0 -> 20.0), more than 5.0 (lower is better)"
    ]
    assert compare_downstream(better, base, 0.0) == []


def test_compare_downstream_refuses_a_negative_limit():
    with pytest.raises(ValueError, match="max_drop_points must be >= 0"):
        compare_downstream(BASE, BASE, -1.0)


def test_downstream_runs_as_a_stage_of_one_shard_per_model_and_resumes(tmp_path: Path, monkeypatch) -> None:
    """Issue 18, 1: lm-eval runs as the `downstream` stage (one shard per model, in its own settings-keyed
    folder), so it is placed like any shard stage and a finished model is not scored again."""
    from sao_core.config import ModelConfig, build_config
    from sao_core.engines.provider import EngineProvider
    from sao_core.evaluation import downstream as downstream_module
    from sao_core.evaluation.eval_stages import read_downstream, run_stage_shard, write_downstream_models
    from sao_core.stages.runner import finalize_stage
    from sao_core.store import models, storage
    from sao_core.store.layout import downstream_url, num_shards

    scored = []

    def fake_run(model_dir: str, tasks: list[str], *, adapter: str | None = None, **kw: object) -> dict:
        scored.append((model_dir, adapter, kw["limit"]))
        value = 0.6 if adapter else 0.5
        metrics = {"acc": {"value": value, "stderr": 0.1, "higher_is_better": True}}
        return {
            "lm_eval_version": "0.4.13",
            "tasks": {t: {"n_samples": 3, "metrics": metrics} for t in tasks},
        }

    monkeypatch.setattr(downstream_module, "run_downstream", fake_run)
    monkeypatch.setattr(models, "resolve_model", lambda ref, *a, **k: f"local:{ref}")
    monkeypatch.setattr(models, "resolve_adapter", lambda ref, *a, **k: f"local:{ref}")

    def no_engine() -> object:
        raise AssertionError("lm-eval loads its own model: no engine is built for downstream")

    cfg = build_config(
        {"engine": {"name": "fake"}, "model": {"path": "base"}, "evaluation": {"downstream": {"limit": 3}}}
    )
    out = downstream_url(str(tmp_path / "model"), cfg)
    assert out.startswith(f"{tmp_path}/model/eval/downstream-")
    write_downstream_models(cfg, out, ModelConfig(path="base", adapter="policy"))
    assert num_shards(out, "downstream") == 2

    def run() -> dict:
        for index in range(2):
            run_stage_shard("downstream", cfg, out, index, EngineProvider(cfg, no_engine))  # type: ignore[arg-type]
        finalize_stage("downstream", cfg, out)
        return read_downstream(out, cfg.run.format)

    runs = run()
    assert scored == [("local:base", "local:policy", 3), ("local:base", None, 3)]
    assert runs["candidate"]["tasks"]["sao_arith"]["metrics"]["acc"]["value"] == 0.6
    assert runs["current"]["tasks"]["sao_capitals"]["metrics"]["acc"]["value"] == 0.5
    assert run() == runs and len(scored) == 2  # done: not scored again
    storage.remove(f"{out}/downstream/_shards/part-00000.json")
    assert run() == runs and scored[2:] == [("local:base", "local:policy", 3)]  # only the lost one
