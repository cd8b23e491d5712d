"""The `sao` command. Every subcommand's arguments are parsed here, in the top layer, which may use them all.

    sao synth --config configs/cpu-smollm2.yaml [--set personas.n=8 ...]   # the data stages, no Prefect
    sao run --config configs/cpu-smollm2.yaml                               # a whole round on Prefect
    sao train --config CFG --pairs URL [--output URL]                       # preference optimisation
    sao deploy [--gpu-pool-type docker] [--cron "0 2 * * *"]                # pools, automation, deployments
    sao -v synth --config ...                                               # also log every shard

Prefect is imported by `sao run` only, so `sao synth` and `sao train` start without it. Exit codes: 0 done,
2 for an error the pipeline can name (bad config key, missing model, bad pairs, ...), printed on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from sao_core.errors import SAOError

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


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
    from flows.sao_round import sao_round

    where = os.environ.get("PREFECT_API_URL") or "a temporary local Prefect server"
    print(f"sao run: {args.config} on {where}", flush=True)
    result = sao_round(args.config, args.overrides)
    print(f"round folder: {result['round_dir']}")
    print(f"model: {result['model']}")
    if result.get("evaluation"):
        e = result["evaluation"]
        print(
            f"evaluation: win rate {e['win_rate']} ({e['wins']} wins, {e['losses']} losses, {e['ties']} ties)"
        )
    print(f"report: {result['report']}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from sao_core.config import load_config
    from sao_core.training import train

    cfg = load_config(args.config, args.overrides)
    manifest = train(cfg, args.pairs, args.output)
    keys = ("objective", "steps", "seconds", "tokens_per_s", "final_loss", "adapter", "full_model")
    print(json.dumps({k: manifest.get(k) for k in keys}))
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from flows.deploy import deploy

    steps = deploy(
        gpu_pool_type=args.gpu_pool_type,
        train_pool_type=args.train_pool_type,
        cron=args.cron,
        timezone=args.timezone,
        heartbeat_grace_s=args.heartbeat_grace_s,
    )
    for step in steps:
        print(step)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sao", description="Self-Alignment Optimization pipeline")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log every shard and training step of the library (under `run`, also into Prefect's run logs)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    synth = sub.add_parser("synth", help="run the data stages of one round: personas to preference pairs")
    add_config_args(synth)
    synth.set_defaults(func=cmd_synth)
    run = sub.add_parser(
        "run", help="run a whole round (data, gate, training, evaluation, report) on Prefect"
    )
    add_config_args(run)
    run.set_defaults(func=cmd_run)
    train = sub.add_parser(
        "train",
        help="train the model on preference pairs (SimPO, DPO or ORPO; LoRA or full)",
        description="Train on a pairs folder or file. training.launcher picks one process, accelerate or "
        "torchrun; a rerun resumes from the last checkpoint and a finished run is not redone.",
    )
    add_config_args(train)
    train.add_argument(
        "--pairs", required=True, help="pairs folder ({round}/pairs) or one .jsonl/.parquet file, by URL"
    )
    train.add_argument(
        "--output", default=None, help="model folder URL (default: {round}/model/{training hash})"
    )
    train.set_defaults(func=cmd_train)
    deploy = sub.add_parser(
        "deploy",
        help="create the work pools, the crash automation and every deployment of prefect.yaml",
        description="Against the server PREFECT_API_URL names: work pools sao-cpu, sao-gpu-batch and "
        "sao-train from deployments/pools/, an automation marking runs without heartbeats Crashed, the "
        "nightly schedule's variables, then `prefect --no-prompt deploy --all`.",
    )
    pool_types = ("process", "docker", "kubernetes")
    deploy.add_argument("--gpu-pool-type", choices=pool_types, default="process", help="sao-gpu-batch's type")
    deploy.add_argument("--train-pool-type", choices=pool_types, default="process", help="sao-train's type")
    deploy.add_argument(
        "--cron", help="nightly schedule (Prefect variable sao_nightly_cron; default 0 2 * * *)"
    )
    deploy.add_argument("--timezone", help="its timezone (variable sao_nightly_timezone; default UTC)")
    deploy.add_argument(
        "--heartbeat-grace-s",
        type=int,
        default=600,
        help="mark a flow run Crashed after this long without a heartbeat (runs beat every 180 s)",
    )
    deploy.set_defaults(func=cmd_deploy)
    return parser


def setup_logging(command: str, verbose: bool) -> None:
    """Warnings only by default; with -v the library's INFO lines (one per shard, per training step).

    `run` leaves the handlers to Prefect (task and flow run names on every line); -v then adds the
    library's logger to Prefect's extra loggers, so its lines also reach each task run's logs in the UI.
    """
    if command in ("run", "deploy"):
        if verbose:
            extra = [n for n in os.environ.get("PREFECT_LOGGING_EXTRA_LOGGERS", "").split(",") if n]
            os.environ["PREFECT_LOGGING_EXTRA_LOGGERS"] = ",".join(dict.fromkeys([*extra, "sao_core"]))
            logging.getLogger("sao_core").setLevel(logging.INFO)
        return
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT, stream=sys.stderr)
    logging.getLogger("sao_core").setLevel(logging.INFO if verbose else logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.command, args.verbose)
    try:
        return int(args.func(args))
    except SAOError as e:
        print(f"sao {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
