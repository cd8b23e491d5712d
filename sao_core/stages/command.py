"""One shard of a model stage as a command, for a person to run (or redo) by hand without Prefect.

    python -m sao_core.stages responses --round artifacts/smollm2-cpu/round_001-abc123 --shard 3
    python -m sao_core.stages prompts --round R --shard 0 --config R/resolved_config.yaml --set engine.name=transformers

The config defaults to the round's resolved_config.yaml. The engine is the config's, built as the
pipeline builds it (engine.name vllm: a worker child under engine.python). It exits 0 after writing the
shard and its manifest, 1 on an error it can name, 2 on bad arguments, and prints one JSON line with the
shard's manifest summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from sao_core.engines.provider import EngineProvider
from sao_core.errors import SAOError
from sao_core.stages.runner import run_shard
from sao_core.store import storage
from sao_core.store.layout import MODEL_STAGES, load_config

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sao_core.stages",
        description="Run one shard of a model stage in this process and write it with its manifest.",
    )
    parser.add_argument("stage", choices=MODEL_STAGES, help="the model stage")
    parser.add_argument("--round", required=True, help="the round folder (any fsspec URL)")
    parser.add_argument("--shard", type=int, required=True, help="shard index, from 0")
    parser.add_argument("--config", help="round config (default: ROUND/resolved_config.yaml)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set engine.batch_size=8 (repeatable)",
    )  # fmt: skip
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the arguments, run the shard, print its summary; the exit code says how it went."""
    args = build_parser().parse_args(argv)
    stage = args.stage
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    prog = f"sao_core.stages {stage}"
    engines: EngineProvider | None = None
    try:
        cfg = load_config(args.config or storage.join(args.round, "resolved_config.yaml"), args.overrides)
        engines = EngineProvider(cfg)
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
