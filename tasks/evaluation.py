"""Evaluation: the trained policy against the campaign's current model (and the original), judged in both
orders, and the judge rated on labelled pairs (sao_core.evaluation.compare).

Its model steps are stages in {model}/eval/{evaluation settings hash}/ (sao_core.evaluation.eval_stages):
each contender's answers, then the judge's verdicts. Their shards run where the round's shards run
(`fanout.mode`): in this process, as concurrent tasks over `vllm serve` replicas (a LoRA candidate is
loaded into them at run time), or as batches on the gpu-batch deployment, so on a cluster the round's
own process loads no model.
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.futures import PrefectFuture, wait

from sao_core.config import RoundConfig
from sao_core.evaluation.compare import headline, summarize_evaluation
from sao_core.evaluation.eval_stages import (
    contenders,
    describe,
    judge_config,
    write_cases,
    write_contenders,
    write_eval_prompts,
)
from sao_core.stages.runner import finalize_stage
from sao_core.store import storage
from sao_core.store.layout import evaluation_url, num_shards, stage_settings_hash
from tasks.artifacts import artifact_key
from tasks.cache import load_round_config, make_cache_key, retry_unless_permanent
from tasks.engines import free_engines
from tasks.shards import Progress, shard_task


def run_stage(stage: str, cfg: RoundConfig, round_ref: dict[str, Any], stage_dir: str) -> dict[str, Any]:
    """Every shard of an evaluation (or downstream) stage in `stage_dir`, placed as the round's fan-out
    says (tasks/shards.py), then the stage's manifest. Finished shards are skipped wherever they ran."""
    settings = stage_settings_hash(cfg, stage)
    total = num_shards(stage_dir, stage)
    progress = Progress(cfg.run.campaign, stage, total)
    if cfg.fanout.mode == "deployment":
        from tasks.fanout import run_on_deployment

        # The batch runs take the stage's folder where a data stage's take the round's.
        run_on_deployment(stage, cfg, {**round_ref, "round_dir": stage_dir}, settings, total, progress.update)
        return finalize_stage(stage, cfg, stage_dir)
    shard = shard_task(round_ref.get("result_storage"), round_ref["shard_timeout_s"])
    args = [(stage, round_ref["config_url"], stage_dir, index, settings) for index in range(total)]
    if cfg.fanout.mode == "replicas":
        limit = cfg.fanout.concurrency or len((cfg.evaluation.engine or cfg.engine).base_urls) or 1
        done = 0
        for begin in range(0, total, limit):  # `limit` shards in flight, so every replica stays busy
            futures: list[PrefectFuture] = [shard.submit(*a) for a in args[begin : begin + limit]]
            wait(futures)
            for future in futures:
                future.result()  # the first failure fails the stage, after its retries
            done += len(futures)
            progress.update(done)
    else:
        for index, a in enumerate(args):
            shard(*a)
            progress.update(index + 1)
    return finalize_stage(stage, cfg, stage_dir)


def _evaluation_output(parameters: dict[str, Any]) -> str | None:
    """What is wrong with the evaluation folder for these settings, or None when it holds its verdicts
    and its manifest (written last, so a finished evaluation)."""
    cfg = load_round_config(parameters["round_ref"]["config_url"])
    out = evaluation_url(parameters["model"]["url"], cfg)
    if not storage.exists(storage.join(out, "manifest.json")):
        return f"{storage.join(out, 'manifest.json')} is missing"
    if not storage.list_files(out, "results*.jsonl"):
        return f"{out} has no results*.jsonl"
    return None


@task(
    name="evaluate",
    task_run_name="evaluate-round-{round_ref[round]}",
    retries=1,
    retry_delay_seconds=10,
    retry_condition_fn=retry_unless_permanent,
    cache_key_fn=make_cache_key("evaluate", "model", output=_evaluation_output),
    persist_result=True,
)
def evaluate(round_ref: dict[str, Any], settings_hash: str, model: dict[str, Any]) -> dict[str, Any]:
    """The trained policy against the current model (and the original), the judge on the trust set."""
    cfg = load_round_config(round_ref["config_url"])
    out = evaluation_url(model["url"], cfg)
    models = write_contenders(cfg, out, model)
    write_eval_prompts(cfg, out)
    for name in contenders(cfg):
        run_stage(f"answers-{name}", cfg, round_ref, out)
    write_cases(cfg, out)
    run_stage("verdicts", cfg, round_ref, out)
    free_engines()  # the judge's engine (and a runtime-loaded adapter on served replicas) is done
    names = {name: describe(m) if name != "original" else m.path for name, m in models.items()}
    result = summarize_evaluation(cfg, out, names, describe(judge_config(cfg).model))
    create_table_artifact(
        headline(result),
        key=artifact_key(cfg.run.campaign, "evaluation"),
        description=f"round {cfg.run.round}: {result['prompts']} instructions ({result['prompt_set']}), "
        f"judge {result['judge']} in both orders",
    )
    return {**result, "url": out}
