"""The evaluation as stages in the store, run by the shard runner like the data stages.

    eval_dir = evaluation_url(model_url, cfg)                 # {model}/eval/{evaluation settings hash}
    write_contenders(cfg, eval_dir, model)                    # who answers: candidate, current, original
    write_eval_prompts(cfg, eval_dir)                         # the instruction set, in shards
    for name in contenders(cfg): run_model_stage(f"answers-{name}", stage_config(cfg, ...), eval_dir, ...)
    write_cases(cfg, eval_dir)                                # candidate vs each baseline, and the trust set
    run_model_stage("verdicts", judge_config(cfg), eval_dir, ...)

The two model stages (answers-NAME, verdicts) are sharded, claimed, manifested and skipped when done
like responses and judgements (sao_core.stages.runner), so they fan out to GPU workers or replicas the
same way; `stage_config` tells a worker which model and engine a stage's shards need, from the round
config and the evaluation folder alone. Downstream (lm-eval) is a stage too: one shard per model scored
(`write_downstream_models`, `downstream_producer`). The no-model steps between them are cheap and
written whole under the stage's claim, and a second runner finds them done.
"""

from __future__ import annotations

import json
from typing import Any

from sao_core.config import ModelConfig, RoundConfig
from sao_core.engines.provider import EngineProvider
from sao_core.stages.runner import ProduceFn, run_shard
from sao_core.store import locks, shards, storage
from sao_core.store.evalsets import load_eval_prompts, load_judge_trust
from sao_core.store.layout import (
    CONTENDERS,
    DOWNSTREAM_MODELS,
    EVAL_CASES,
    EVAL_PROMPTS,
    claim_ttl,
    claim_wait,
    digest,
    eval_shard_size,
    stage_claim_url,
    stage_settings_hash,
    stage_url,
)
from sao_core.store.shards import ShardManifest

CONTENDERS_FILE = "contenders.json"


def contenders(cfg: RoundConfig) -> list[str]:
    """Who answers the instructions: the candidate, the current model, and the original when it differs."""
    original = cfg.evaluation.original
    return ["candidate", "current"] + (["original"] if original and original != cfg.model.path else [])


def served(cfg: RoundConfig) -> bool:
    """Whether the evaluation's models answer from OpenAI-compatible servers (engine.name openai)."""
    return (cfg.evaluation.engine or cfg.engine).name == "openai"


def policy_model(cfg: RoundConfig, model: dict[str, Any], for_servers: bool = False) -> ModelConfig:
    """The trained policy as a model reference: its full weights when written, else base + adapter.
    For served replicas (`for_servers`) the adapter, loaded into them at run time: they hold the base."""
    if model.get("full") and not (for_servers and model.get("adapter")):
        return cfg.model.model_copy(update={"path": model["full"], "adapter": None, "revision": None})
    return cfg.model.model_copy(update={"adapter": model["adapter"]})


def contender_models(cfg: RoundConfig, model: dict[str, Any]) -> dict[str, ModelConfig]:
    out = {"candidate": policy_model(cfg, model, for_servers=served(cfg)), "current": cfg.model}
    if "original" in contenders(cfg):
        original = cfg.evaluation.original or ""
        out["original"] = cfg.model.model_copy(update={"path": original, "adapter": None, "revision": None})
    return out


def describe(model: ModelConfig) -> str:
    return model.path + (f" + adapter {model.adapter}" if model.adapter else "")


def write_contenders(cfg: RoundConfig, eval_dir: str, model: dict[str, Any]) -> dict[str, ModelConfig]:
    """{eval_dir}/contenders.json: each contender's model, which a worker running its answers reads."""
    models = contender_models(cfg, model)
    text = json.dumps({k: m.model_dump(mode="json") for k, m in models.items()}, sort_keys=True, indent=1)
    url = storage.join(eval_dir, CONTENDERS_FILE)
    try:
        same = storage.read_text(url) == text
    except FileNotFoundError:
        same = False
    if not same:
        storage.write_text(url, text)
    return models


def loaded_config(cfg: RoundConfig, model: ModelConfig) -> RoundConfig:
    """The round config with `model` on the evaluation's engine (evaluation.engine, else the round's)."""
    return cfg.model_copy(update={"model": model, "engine": cfg.evaluation.engine or cfg.engine})


def judge_config(cfg: RoundConfig) -> RoundConfig:
    """The round config with the evaluation's judge as model and engine (default: the current model)."""
    j = cfg.evaluation.judge
    return cfg.model_copy(update={"model": j.model or cfg.model, "engine": j.engine or cfg.engine})


def stage_config(cfg: RoundConfig, stage: str, round_dir: str) -> RoundConfig:
    """The config whose model and engine run `stage`'s shards: the round's for the data stages (and
    downstream, which loads its models through lm-eval), a contender's for answers-NAME, the judge's for
    verdicts. `round_dir` is the evaluation folder for an evaluation stage."""
    if stage.startswith("answers-"):
        name = stage.removeprefix("answers-")
        if name not in CONTENDERS:
            raise ValueError(f"unknown evaluation stage {stage!r}; contenders: {', '.join(CONTENDERS)}")
        url = storage.join(round_dir, CONTENDERS_FILE)
        try:
            found = json.loads(storage.read_text(url))[name]
        except (FileNotFoundError, KeyError) as e:
            raise ValueError(f"{url} names no {name!r}: write_contenders runs before {stage}") from e
        return loaded_config(cfg, ModelConfig(**found))
    if stage == "verdicts":
        return judge_config(cfg)
    return cfg


def run_stage_shard(
    stage: str, cfg: RoundConfig, round_dir: str, index: int, engines: EngineProvider
) -> ShardManifest:
    """One shard of any sharded stage: the runner's, with lm-eval making the downstream shards."""
    produce = downstream_producer(cfg) if stage == "downstream" else None
    return run_shard(stage, cfg, round_dir, index, engines, produce=produce)


# --- the no-model steps -----------------------------------------------------------------------------


def _write_whole(
    cfg: RoundConfig, out_dir: str, stage: str, rows_by_shard: list[list[dict[str, Any]]], input_sha: str
) -> dict[str, Any]:
    """Write a no-model stage at once under its claim, unless it is there from the same input and settings."""
    out = stage_url(out_dir, stage)
    settings = stage_settings_hash(cfg, "downstream" if stage == DOWNSTREAM_MODELS else "verdicts")
    inputs = [(input_sha, settings)] * len(rows_by_shard)
    done = shards.stage_is_done(out, inputs)
    if done is not None:
        return done
    with locks.hold(stage_claim_url(out_dir, stage), stage, claim_ttl(cfg), claim_wait(cfg)):
        done = shards.stage_is_done(out, inputs)
        if done is not None:
            return done
        entries = []
        for i, rows in enumerate(rows_by_shard):
            entry = ShardManifest(
                stage=stage, shard=i, rows_in=len(rows), input_sha256=input_sha, settings_hash=settings
            )
            entries.append(shards.write_shard(out, i, rows, [], cfg.run.format, entry))
        return shards.write_stage_manifest(out, stage, entries, format=cfg.run.format)


def _chunks(rows: list[dict[str, Any]], size: int) -> list[list[dict[str, Any]]]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def _rows_digest(rows: list[dict[str, Any]]) -> str:
    return digest(json.dumps(rows, sort_keys=True, ensure_ascii=False))


def write_eval_prompts(cfg: RoundConfig, eval_dir: str) -> dict[str, Any]:
    """The evaluation's instructions (evaluation.prompts, the first evaluation.n) in shards of
    eval_shard_size(cfg) rows."""
    e = cfg.evaluation
    rows = [
        {"id": p.id, "instruction": p.instruction, "category": p.category}
        for p in load_eval_prompts(e.prompts, e.n)
    ]
    if not rows:
        raise ValueError(f"evaluation.prompts {e.prompts!r} holds no instructions")
    return _write_whole(cfg, eval_dir, EVAL_PROMPTS, _chunks(rows, eval_shard_size(cfg)), _rows_digest(rows))


def write_cases(cfg: RoundConfig, eval_dir: str, baselines: list[str] | None = None) -> dict[str, Any]:
    """The judge's cases: the candidate's answer (first) against each baseline's (second), instruction by
    instruction, then the trust set's labelled pairs (better first); each kind in shards of its own.
    `baselines` defaults to the config's (contenders)."""
    fmt = cfg.run.format
    baselines = contenders(cfg)[1:] if baselines is None else baselines
    prompts = shards.read_stage_rows(stage_url(eval_dir, EVAL_PROMPTS), fmt)
    names = ["candidate", *baselines]
    answers = {n: shards.read_stage_rows(stage_url(eval_dir, f"answers-{n}"), fmt) for n in names}
    by_shard: list[list[dict[str, Any]]] = []
    for base in baselines:
        rows = []
        for p, c, b in zip(prompts, answers["candidate"], answers[base], strict=True):
            if not p["id"] == c["id"] == b["id"]:
                raise ValueError(
                    f"{eval_dir}: answers of {base} and candidate are not in the instructions' order"
                )
            rows.append(
                {
                    "kind": base,
                    "id": p["id"],
                    "category": p["category"],
                    "instruction": p["instruction"],
                    "first": c["answer"],
                    "second": b["answer"],
                }
            )
        by_shard += _chunks(rows, eval_shard_size(cfg))
    trust = load_judge_trust(cfg.evaluation.trust)
    if cfg.evaluation.trust_n is not None:
        trust = trust[: cfg.evaluation.trust_n]
    trust_rows = [
        {
            "kind": "trust",
            "id": t.id,
            "category": t.kind,
            "instruction": t.instruction,
            "first": t.better,
            "second": t.worse,
        }
        for t in trust
    ]
    by_shard += _chunks(trust_rows, eval_shard_size(cfg))
    source = [shards.manifest_digest(shards.read_stage_manifest(stage_url(eval_dir, EVAL_PROMPTS)))]
    source += [
        shards.manifest_digest(shards.read_stage_manifest(stage_url(eval_dir, f"answers-{n}")))
        for n in answers
    ]
    return _write_whole(cfg, eval_dir, EVAL_CASES, by_shard, digest(*source, _rows_digest(trust_rows)))


# --- downstream ---------------------------------------------------------------------------------------


def write_downstream_models(cfg: RoundConfig, out_dir: str, candidate: ModelConfig) -> dict[str, Any]:
    """The models lm-eval scores, one shard each: the candidate, then the current model (its baseline)."""
    rows = [
        {"name": name, "path": m.path, "adapter": m.adapter}
        for name, m in (("candidate", candidate), ("current", cfg.model))
    ]
    return _write_whole(cfg, out_dir, DOWNSTREAM_MODELS, [[r] for r in rows], _rows_digest(rows))


def downstream_producer(cfg: RoundConfig) -> ProduceFn:
    """lm-eval on each model of a downstream shard (sao_core.evaluation.downstream), offline."""

    def produce(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any], str]:
        from sao_core.evaluation.downstream import run_downstream
        from sao_core.store.models import resolve_adapter, resolve_model

        d = cfg.evaluation.downstream
        out = []
        for row in rows:
            result = run_downstream(
                resolve_model(row["path"]),
                list(d.tasks),
                adapter=resolve_adapter(row["adapter"]) if row["adapter"] else None,
                include_path=d.include_path,
                limit=d.limit,
                batch_size=d.batch_size,
                device=cfg.engine.device,
                dtype=cfg.engine.dtype,
                num_fewshot=d.num_fewshot,
                seed=cfg.run.seed,
            )
            # As JSON text: task and metric names vary, which a Parquet column could not hold.
            out.append({**row, "result": json.dumps(result, sort_keys=True)})
        return out, {}, ", ".join(describe(ModelConfig(path=r["path"], adapter=r["adapter"])) for r in rows)

    return produce


def read_downstream(out_dir: str, fmt: str) -> dict[str, dict[str, Any]]:
    """Each scored model's run_downstream result, by name (candidate, current)."""
    rows = shards.read_stage_rows(stage_url(out_dir, "downstream"), fmt)
    return {r["name"]: json.loads(r["result"]) for r in rows}
