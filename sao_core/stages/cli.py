"""One shard of a model stage as a command: what the vllm engine's child runs, and what a person runs by hand.

    python -m sao_core.stages.responses --round artifacts/smollm2-cpu/round_001-abc123 --shard 3
    python -m sao_core.stages.prompts --round R --shard 0 --config R/resolved_config.yaml --set engine.name=transformers

The config defaults to the round's resolved_config.yaml. No Prefect is needed: any engine runs here, in
this process (engine.name vllm included: this command is the child, so it never spawns another). It
exits 0 after writing the shard and its manifest, 1 on an error it can name, 2 on bad arguments, and
prints one JSON line with the shard's manifest summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence

from sao_core import storage
from sao_core.config import RoundConfig, load_config
from sao_core.engines import Engine, make_engine
from sao_core.errors import SAOError
from sao_core.stages.layout import input_stage, shard_target, stage_url
from sao_core.stages.runner import EngineProvider, run_shard

log = logging.getLogger(__name__)


def build_engine(cfg: RoundConfig, model_dir: str | None = None) -> Engine:
    """The engine of a shard command: vLLM in this process for engine.name vllm, else make_engine."""
    if cfg.engine.name == "vllm":
        from sao_core.engines.vllm_worker import VLLMWorkerEngine

        return VLLMWorkerEngine(cfg.engine, cfg.model, seed=cfg.run.seed, model_dir=model_dir)
    return make_engine(cfg.engine, cfg.model, seed=cfg.run.seed)


def _load_if_needed(
    stage: str, cfg: RoundConfig, round_dir: str, index: int, engines: EngineProvider
) -> None:
    """Load the model before run_shard times the shard, so its manifest's seconds are generation only.

    Skipped for a finished shard, and for an empty input shard (nothing to generate: vLLM never starts).
    """
    target = shard_target(stage, cfg, round_dir, index)
    if storage.shard_is_done(target.out_url, index, target.input_sha256, target.settings_hash) is not None:
        return
    entry = storage.read_shard_manifest(stage_url(round_dir, input_stage(stage)), index)
    if entry is None or entry.rows_out == 0:
        return
    start = time.perf_counter()
    engine = engines.get()
    load = getattr(engine, "load", None)
    if callable(load):
        load()
    log.info("%s shard %d: %s engine ready in %.1fs", stage, index, engine.name, time.perf_counter() - start)


def build_parser(stage: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python -m sao_core.stages.{stage}",
        description=f"Run one shard of the {stage} stage in this process and write it with its manifest.",
    )
    parser.add_argument("--round", required=True, help="the round folder (any fsspec URL)")
    parser.add_argument("--shard", type=int, required=True, help="shard index, from 0")
    parser.add_argument("--config", help="round config (default: ROUND/resolved_config.yaml)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set engine.batch_size=8 (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--model-dir",
        help="the model's local folder, already resolved (the config's model.path stays its identity)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    return parser


def main(stage: str, argv: Sequence[str] | None = None) -> int:
    """Parse the arguments, run the shard, print its summary; the exit code says how it went."""
    args = build_parser(stage).parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    # This process is the shard's child: run_shard must not hand the shard to yet another one.
    os.environ["SAO_STAGE_CHILD"] = "1"
    prog = f"sao_core.stages.{stage}"
    engines: EngineProvider | None = None
    try:
        cfg = load_config(args.config or storage.join(args.round, "resolved_config.yaml"), args.overrides)
        engines = EngineProvider(cfg, factory=lambda: build_engine(cfg, args.model_dir))
        _load_if_needed(stage, cfg, args.round, args.shard, engines)
        entry = run_shard(stage, cfg, args.round, args.shard, engines)
    except (SAOError, ValueError, FileNotFoundError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        if engines is not None:
            engines.close()
    summary = {
        "stage": stage,
        "shard": entry.shard,
        "file": entry.file,
        "rows_in": entry.rows_in,
        "rows_out": entry.rows_out,
        "drops": entry.drops,
        "seconds": entry.seconds,
        "completion_tokens": entry.completion_tokens,
    }
    print(json.dumps(summary), flush=True)
    return 0
