"""The `sao` command. Every subcommand's arguments are parsed here, in the top layer, which may use them all.

    sao synth --config configs/cpu-smollm2.yaml [--set personas.n=8 ...]   # the data stages, no Prefect
    sao run --config configs/cpu-smollm2.yaml                               # a whole round on Prefect
    sao train --config CFG --pairs URL [--output URL]                       # preference optimisation
    sao deploy [--gpu-pool-type docker] [--cron "0 2 * * *"]                # pools, automation, deployments
    sao promote ROUND_DIR --why TEXT [--model URL]                          # the campaign's next rounds start from it
    sao campaign-resume --config CFG --why TEXT                             # a paused campaign plans again
    sao rollback --config CFG --why TEXT [--to SEQ]                         # back to an earlier promoted model
    sao campaign-status --config CFG [--json]                               # what is current, and every record
    sao lineage MODEL_OR_ROUND [--pair ID] [--json]                         # where a model or round came from
    sao -v synth --config ...                                               # also log every shard

Prefect is imported by `sao run` and `sao deploy` only, so the other commands start without it. Exit codes:
0 done, 2 for an error the pipeline can name (bad config key, missing model, bad pairs, ...), printed on
stderr; `sao lineage --pair` exits 1 when a link of the trace does not hold.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from sao_core.campaign import ledger, planning
from sao_core.errors import SAOError
from sao_core.redact import error_line
from sao_core.store import storage

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="round recipe: a YAML path or any fsspec URL")
    add_overrides_arg(p, "judging.swap=true")


def add_overrides_arg(p: argparse.ArgumentParser, example: str) -> None:
    """`--set KEY=VALUE`, repeatable: config overrides, collected in `overrides`."""
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config value, e.g. --set {example} (repeatable)",
    )


def cmd_synth(args: argparse.Namespace) -> int:
    from sao_core.stages.synth import format_diagnostics, format_stage_line, run_synth
    from sao_core.store.layout import load_config

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


def check_config(args: argparse.Namespace) -> None:
    """Load the recipe and its overrides before anything starts (no Prefect server, no model): a bad one
    is one line and exit 2 (main), not a temporary server and two tracebacks."""
    from sao_core.store.layout import load_config

    load_config(args.config, args.overrides)


def cmd_run(args: argparse.Namespace) -> int:
    check_config(args)
    from flows.sao_round import sao_round

    where = os.environ.get("PREFECT_API_URL") or "a temporary local Prefect server"
    print(f"sao run: {args.config} on {where}", flush=True)
    result = sao_round(args.config, args.overrides)
    print(f"round folder: {result['round_dir']}")
    print(f"model: {result['model']}")
    _print_round(result)
    return 0


def _print_round(result: dict) -> None:
    if result.get("evaluation"):
        e = result["evaluation"]
        low, high = e["win_rate_ci"]
        print(
            f"evaluation: win rate {e['win_rate']} (95% interval {low} to {high}; {e['wins']} wins, "
            f"{e['losses']} losses, {e['ties']} ties), LC {e['lc_win_rate']}, judge agreement {e['judge_agreement']}"
        )
    outcome = result.get("outcome") or {}
    if outcome:
        print(f"outcome: {outcome['status']}: {outcome['why']}")
    print(f"report: {result['report']}")


def cmd_campaign(args: argparse.Namespace) -> int:
    from sao_core.errors import ConfigError

    if args.rounds < 1:
        raise ConfigError(f"--rounds must be at least 1, got {args.rounds}")
    check_config(args)
    from flows.campaign import sao_campaign

    where = os.environ.get("PREFECT_API_URL") or "a temporary local Prefect server"
    print(f"sao campaign: {args.rounds} round(s) of {args.config} on {where}", flush=True)
    result = sao_campaign(args.config, args.overrides, rounds=args.rounds)
    for r in result["rounds"]:
        print(f"round {r['round']}: {r['status']}: {r['why']} ({r['round_dir']})")
    print(f"campaign report: {result['report']}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from sao_core.store.layout import load_config
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


def add_campaign_args(p: argparse.ArgumentParser) -> None:
    """Which campaign: from a round recipe (run.root, run.campaign), or named outright."""
    p.add_argument("--config", help="a round recipe whose run.root and run.campaign name the campaign")
    add_overrides_arg(p, "run.campaign=nightly")
    p.add_argument("--campaign-root", help="the artifact root (run.root): a folder or any fsspec URL")
    p.add_argument("--campaign", help="the campaign's name (run.campaign)")


def campaign_from_args(args: argparse.Namespace) -> tuple[str, str]:
    """(root, campaign) from --campaign-root/--campaign, else from the recipe --config names."""
    from sao_core.errors import ConfigError

    root, name = args.campaign_root, args.campaign
    if args.config:
        from sao_core.store.layout import load_config

        cfg = load_config(args.config, args.overrides)
        root, name = root or cfg.run.root, name or cfg.run.campaign
    if not root or not name:
        raise ConfigError("say which campaign: --config CFG, or --campaign-root ROOT and --campaign NAME")
    return root, name


def _print_record(verb: str, record: Any) -> None:
    loads = f"model.path {record.model_path}"
    if record.model_adapter:
        loads += f", model.adapter {record.model_adapter}"
    print(f"{verb}: record {record.seq} ({record.action}), round {record.round}: {record.model}")
    print(f"next round loads: {loads}")
    print(f"by {record.who} at {record.when}: {record.why}")


def cmd_promote(args: argparse.Namespace) -> int:

    round_dir = storage.normalise_url(args.round_dir)
    root, name = planning.campaign_of_round(round_dir)
    model = args.model or planning.round_model(round_dir)
    before = ledger.current(root, name)
    record = ledger.promote(root, name, round_dir, model, who=args.who, why=args.why)
    _print_record("already current" if before == record else "promoted", record)
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:

    root, name = campaign_from_args(args)
    record = ledger.rollback(root, name, who=args.who, why=args.why, to_seq=args.to)
    _print_record(f"rolled back to record {record.to_seq}", record)
    return 0


def cmd_campaign_resume(args: argparse.Namespace) -> int:

    root, name = campaign_from_args(args)
    url = planning.resume(root, name, who=args.who, why=args.why)
    print(f"resumed: failed rounds so far no longer count towards the pause ({url})")
    return 0


def cmd_campaign_status(args: argparse.Namespace) -> int:

    root, name = campaign_from_args(args)
    latest = ledger.current(root, name)
    records = ledger.history(root, name)
    if args.json:
        out = {
            "campaign": ledger.campaign_url(root, name),
            "current": latest.to_dict() if latest else None,
            "history": [r.to_dict() for r in records],
        }
        print(json.dumps(out, indent=2))
    else:
        print(ledger.format_history(latest, records, name), end="")
    return 0


def cmd_lineage(args: argparse.Namespace) -> int:
    from sao_core.campaign.lineage import lineage, round_of, trace_pair

    if args.pair:
        round_dir, _ = round_of(args.ref)
        trace = trace_pair(round_dir, args.pair)
        print(json.dumps(trace.to_dict(), indent=2, ensure_ascii=False) if args.json else trace.to_markdown())
        return 1 if trace.problems else 0
    lin = lineage(args.ref, verify=args.verify)
    print(json.dumps(lin.to_dict(), indent=2, ensure_ascii=False) if args.json else lin.to_markdown())
    return 0


def add_campaign_state_commands(sub: Any) -> None:
    """promote, rollback, campaign-status and lineage: the campaign's promotion records and provenance."""
    promote = sub.add_parser(
        "promote",
        help="make a round's trained model the one the campaign's next rounds start from",
        description="Writes a new record under {root}/{campaign}/promotions/ and updates CURRENT. The "
        "campaign is the round folder's parent. The model must be a finished training run on the round's "
        "pairs; promoting the current model again writes nothing.",
    )
    promote.add_argument("round_dir", help="the round folder, {root}/{campaign}/round_{k:03d}-{hash}")
    promote.add_argument("--why", required=True, help="the reason, kept in the history")
    promote.add_argument(
        "--model", help="the training run's output folder (default: the round's finished run under model/)"
    )
    promote.add_argument("--who", help="who promotes (default: $SAO_USER, else the login name)")
    promote.set_defaults(func=cmd_promote)

    rollback = sub.add_parser(
        "rollback",
        help="go back to the model promoted before the current one (or to record --to)",
        description="Writes a new rollback record; the history keeps every promotion.",
    )
    add_campaign_args(rollback)
    rollback.add_argument("--why", required=True, help="the reason, kept in the history")
    rollback.add_argument("--to", type=int, metavar="SEQ", help="restore the model of this record")
    rollback.add_argument("--who", help="who rolls back (default: $SAO_USER, else the login name)")
    rollback.set_defaults(func=cmd_rollback)

    resume = sub.add_parser(
        "campaign-resume",
        help="let a campaign paused after campaign.max_consecutive_failures failed rounds plan again",
        description="Writes {root}/{campaign}/resumes/after-NNN.json: the failed rounds so far no longer "
        "count towards the pause. Fix what made them fail first.",
    )
    add_campaign_args(resume)
    resume.add_argument("--why", required=True, help="what was fixed, kept in the campaign folder")
    resume.add_argument("--who", help="who resumes (default: $SAO_USER, else the login name)")
    resume.set_defaults(func=cmd_campaign_resume)

    status = sub.add_parser("campaign-status", help="print the current promotion and every record")
    add_campaign_args(status)
    status.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    status.set_defaults(func=cmd_campaign_status)

    lineage = sub.add_parser(
        "lineage",
        help="where a trained model or a round came from: round, parent model, every stage by URL and hash",
    )
    lineage.add_argument("ref", metavar="MODEL_OR_ROUND", help="a round folder or a training output folder")
    lineage.add_argument(
        "--pair", metavar="ID", help="follow one pair (prompt id or response id) back to its persona"
    )
    lineage.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    lineage.add_argument("--verify", action="store_true", help="also read every shard and check its sha256")
    lineage.set_defaults(func=cmd_lineage)


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
    campaign = sub.add_parser(
        "campaign",
        help="run rounds in a row, each from the last promoted model, evaluated and promoted or rejected",
        description="Each round starts from the campaign's current model (CURRENT in the campaign "
        "folder), is evaluated against it and promoted only if the promotion rule holds; the campaign "
        "report is rewritten after every round.",
    )
    add_config_args(campaign)
    campaign.add_argument("--rounds", type=int, default=1, help="how many rounds to run (default 1)")
    campaign.set_defaults(func=cmd_campaign)
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
    add_campaign_state_commands(sub)
    return parser


def setup_logging(command: str, verbose: bool) -> None:
    """Warnings only by default; with -v the library's INFO lines (one per shard, per training step).

    `run` leaves the handlers to Prefect (task and flow run names on every line); -v then adds the
    library's logger to Prefect's extra loggers, so its lines also reach each task run's logs in the UI.
    """
    if command in ("run", "campaign", "deploy"):
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
        # One line, redacted: a URL's credentials never reach the terminal or a CI log (SECURITY.md).
        print(f"sao {args.command}: error: {error_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
