"""The `sao` command.

sao synth --config configs/cpu-smollm2.yaml [--set personas.n=8 ...]   # data stages, no Prefect
sao run --config configs/cpu-smollm2.yaml                               # a whole round on Prefect
sao train --config CFG --pairs URL                                      # preference optimisation
"""

from __future__ import annotations

import argparse
import logging
import sys

from sao_core.errors import SAOError


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="round recipe: a YAML path or any fsspec URL")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set judging.swap=true (repeatable)",
    )


def cmd_synth(args: argparse.Namespace) -> int:
    from sao_core.config import load_config
    from sao_core.pipeline import format_diagnostics, format_stage_line, run_synth

    cfg = load_config(args.config, args.overrides)
    print(
        f"sao synth: model {cfg.model.path}, engine {cfg.engine.name}, {cfg.personas.n} personas", flush=True
    )

    def on_stage(stage: str, summary: dict) -> None:
        print(format_stage_line(stage, summary), flush=True)
        if "diagnostics" in summary:
            print("            " + format_diagnostics(summary["diagnostics"]), flush=True)

    result = run_synth(cfg, on_stage=on_stage)
    print(f"round folder: {result.round_url}")
    print(
        f"pairs: {result.pairs_url} ({result.summary['pairs']['rows_out']} rows, {result.seconds:.1f}s in all)"
    )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    # The orchestration lives outside the library (flows/); importing it by name keeps sao_core free of
    # any Prefect import while `sao run` stays the one command people remember.
    import importlib

    flow_module = importlib.import_module("flows.sao_round")
    argv = ["--config", args.config]
    for override in args.overrides:
        argv += ["--set", override]
    return int(flow_module.main(argv))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sao", description="Self-Alignment Optimization pipeline")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each shard")
    sub = parser.add_subparsers(dest="command", required=True)
    synth = sub.add_parser("synth", help="run the data stages of one round: personas to preference pairs")
    add_config_args(synth)
    synth.set_defaults(func=cmd_synth)
    run = sub.add_parser(
        "run", help="run a whole round (data, gate, training, evaluation, report) on Prefect"
    )
    add_config_args(run)
    run.set_defaults(func=cmd_run)
    from sao_core.training import add_train_parser

    add_train_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "run":  # Prefect sets up its own logging (task and flow run names) for `run`
        logging.basicConfig(
            level=logging.INFO if args.verbose else logging.WARNING,
            format="%(levelname)s %(name)s: %(message)s",
        )
    try:
        return int(args.func(args))
    except SAOError as e:
        print(f"sao {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
