"""What a campaign did, round by round: the record each round leaves, and the report built from them.

    record = round_record(cfg, round_dir, model_url, pairs, judgements, evaluation, downstream, decision)
    write_round_record(round_dir, record)                 # {round}/outcome.json, once the round is decided
    rows = campaign_rows(root, campaign)                  # every decided round, in order
    png = plot_campaign(rows, campaign)
    markdown = campaign_markdown(rows, campaign, "campaign_report.png")   # data_url(png) for the UI

A round is decided when its outcome is recorded, and every round ends with one: promoted, rejected (with
the rules that failed, or "not enough evidence"), superseded (the campaign moved on while it ran: CURRENT
untouched), failed (the stage, the error and its message), not evaluated, or, for a standalone round that
is no campaign round, "would be promoted" / rejected. The report shows per round the pairs kept, the
judge's diagnostics and its agreement with the labelled trust set, the win rate and length-controlled win
rate against the model the round started from and against the campaign's original, each with its counts,
the downstream scores, and the decision with why; a paused campaign says so at the top.
The plot (win rate with its interval, and judge agreement, per round) is a PNG file next to the report
and, for the Prefect UI, inlined in the markdown as a data URL so the UI shows it without a file server.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping
from typing import Any

from sao_core.config import RoundConfig
from sao_core.fmt import pct
from sao_core.store import storage

OUTCOME = "outcome.json"


def round_record(
    cfg: RoundConfig,
    round_dir: str,
    model_url: str | None,
    pairs: Mapping[str, Any] | None,
    judgements: Mapping[str, Any] | None,
    evaluation: Mapping[str, Any] | None,
    downstream: Mapping[str, Any] | None,
    decision: Mapping[str, Any] | None,
    promoted_seq: int | None = None,
    *,
    campaign_round: bool = True,
    superseded: str | None = None,
    planned_seq: int | None = None,
) -> dict[str, Any]:
    """The figures of one decided round, all the campaign report needs (no other file is read for it).

    `campaign_round` False: a standalone round, which says what the rule would decide and never promotes;
    `superseded`: why a round the rule passed was not promoted (the campaign moved on meanwhile);
    `planned_seq`: the promotion record the round started from and was compared with."""
    comparisons = {}
    for name, c in ((evaluation or {}).get("comparisons") or {}).items():
        comparisons[name] = {
            "baseline": c.get("baseline"),
            "win_rate": c.get("win_rate"),
            "ci": [c.get("win_rate_ci_low"), c.get("win_rate_ci_high")],
            "lc_win_rate": c.get("lc_win_rate"),
            "prompts": c.get("prompts", c.get("complete")),
            "judged": c.get("complete"),
            "score": c.get("score"),
            "invalid": c.get("invalid"),
        }
    diagnostics = dict((judgements or {}).get("diagnostics") or {})
    trust = (evaluation or {}).get("trust") or {}
    if decision is None:
        status, why = "not evaluated", "promotion is off or the round has no evaluation"
    else:
        passed = bool(decision.get("promote"))
        why = "; ".join(decision.get("failed") or []) or "every rule held"
        if decision.get("approval"):
            why += f" ({decision['approval']})"
        if not passed:
            status = "rejected"
        elif not campaign_round:
            status = "would be promoted"
            why += " (a standalone round: only campaign rounds move CURRENT; `sao promote` does it by hand)"
        elif superseded:
            status, why = "superseded", f"{why}; but {superseded}"
        else:
            status = "promoted"
    return {
        "round": cfg.run.round,
        "round_dir": round_dir,
        "campaign": cfg.run.campaign,
        "started_from": cfg.model.path + (f" + {cfg.model.adapter}" if cfg.model.adapter else ""),
        "model": model_url,
        "pairs": (pairs or {}).get("rows_out"),
        "judge": {
            "valid_rate": diagnostics.get("valid_rate"),
            "parse_rate": diagnostics.get("parse_rate"),
            "position_bias": diagnostics.get("first_wins_rate"),
            "agreement": trust.get("agreement"),
            "trust_items": trust.get("items"),
            "trust_correct": trust.get("correct_verdicts"),
            "trust_invalid": trust.get("invalid_verdicts"),
        },
        "comparisons": comparisons,
        "downstream": {k: dict((downstream or {}).get(k) or {}) for k in ("scores", "baseline_scores")},
        "status": status,
        "reason": (decision or {}).get("reason"),
        "why": why,
        "checks": list((decision or {}).get("checks") or []),
        "promotion_seq": promoted_seq if status == "promoted" else None,
        "planned_seq": planned_seq,
        "standalone": not campaign_round,
        "failure": None,
    }


def failure_record(
    cfg: RoundConfig,
    round_dir: str,
    stage: str,
    error: str,
    message: str,
    *,
    campaign_round: bool = True,
    planned_seq: int | None = None,
) -> dict[str, Any]:
    """The outcome of a round that failed for good: which stage, which error (its type's name), its message."""
    message = " ".join(message.split())[:2000]
    return {
        "round": cfg.run.round,
        "round_dir": round_dir,
        "campaign": cfg.run.campaign,
        "started_from": cfg.model.path + (f" + {cfg.model.adapter}" if cfg.model.adapter else ""),
        "model": None,
        "pairs": None,
        "judge": {"valid_rate": None, "parse_rate": None, "position_bias": None, "agreement": None},
        "comparisons": {},
        "downstream": {"scores": {}, "baseline_scores": {}},
        "status": "failed",
        "reason": "failed",
        "why": f"failed in {stage}: {error}: {message}",
        "checks": [],
        "promotion_seq": None,
        "planned_seq": planned_seq,
        "standalone": not campaign_round,
        "failure": {"stage": stage, "error": error, "message": message},
    }


def write_round_record(round_dir: str, record: Mapping[str, Any]) -> str:
    url = storage.join(round_dir, OUTCOME)
    storage.write_json(url, dict(record))
    return url


def read_round_record(round_dir: str) -> dict[str, Any] | None:
    url = storage.join(round_dir, OUTCOME)
    return storage.read_json(url) if storage.exists(url) else None


def campaign_rows(root: str, campaign: str) -> list[dict[str, Any]]:
    """Every decided round of the campaign, by round number (a round re-run with other settings: the
    last decided one of that number)."""
    base = storage.join(storage.normalise_url(root), campaign)
    storage.forget_listing(base)  # other processes decide rounds: no cached listing may hide one
    by_round: dict[int, dict[str, Any]] = {}
    for url in storage.list_files(base, f"round_*/{OUTCOME}"):
        record = storage.read_json(url)
        if record.get("standalone"):
            continue  # `sao run` in the campaign's folder: it reports, but is no campaign round
        by_round[int(record["round"])] = record
    return [by_round[k] for k in sorted(by_round)]


def decided_rounds(root: str, campaign: str) -> list[int]:
    return [int(r["round"]) for r in campaign_rows(root, campaign)]


def _comparison(row: Mapping[str, Any], name: str) -> str:
    c = row["comparisons"].get(name)
    if not c:
        return "-"
    low, high = c["ci"]
    counts = ""
    if c.get("score") is not None and c.get("prompts"):
        counts = f" ({c['score']:g} of {c['prompts']}"
        counts += f", {c['invalid']} invalid as ties)" if c.get("invalid") else ")"
    return f"{pct(c['win_rate'])}{counts} [{pct(low)}, {pct(high)}], LC {pct(c['lc_win_rate'])}"


def _judge(row: Mapping[str, Any]) -> str:
    j = row["judge"]
    agreement = pct(j.get("agreement"))
    if j.get("trust_correct") is not None and j.get("trust_items"):
        agreement += f" ({j['trust_correct']} of {2 * j['trust_items']})"
    return f"{pct(j.get('valid_rate'))} / {agreement}"


def _downstream(row: Mapping[str, Any]) -> str:
    scores = row.get("downstream", {}).get("scores") or {}
    return ", ".join(f"{task} {pct(v)}" for task, v in sorted(scores.items())) or "-"


def plot_campaign(rows: list[dict[str, Any]], campaign: str) -> bytes:
    """PNG: win rate (with its interval) against the previous and the original model, and judge agreement."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    rounds = [r["round"] for r in rows]
    for name, label, shift in (("current", "vs previous model", -0.06), ("original", "vs original", 0.06)):
        xs, ys, lows, highs = [], [], [], []
        for r in rows:
            c = r["comparisons"].get(name)
            if c and c["win_rate"] is not None and None not in c["ci"]:
                xs.append(r["round"] + shift)
                ys.append(c["win_rate"])
                lows.append(c["win_rate"] - c["ci"][0])
                highs.append(c["ci"][1] - c["win_rate"])
        if xs:
            left.errorbar(xs, ys, yerr=[lows, highs], fmt="o", capsize=4, label=label)
    left.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
    left.set(title="win rate (95% interval)", xlabel="round", ylim=(0, 1), xticks=rounds)
    if left.get_legend_handles_labels()[0]:  # a campaign of failed rounds has no win rate to plot
        left.legend(loc="lower right", fontsize=8)
    agreement = [(r["round"], r["judge"]["agreement"]) for r in rows if r["judge"]["agreement"] is not None]
    if agreement:
        right.plot([a for a, _ in agreement], [b for _, b in agreement], "o-", label="judge agreement")
    colours = {"promoted": "tab:green", "rejected": "tab:red", "failed": "black", "superseded": "tab:orange"}
    for r in rows:
        right.axvspan(
            r["round"] - 0.4, r["round"] + 0.4, color=colours.get(r["status"], "lightgrey"), alpha=0.12
        )
    right.set(title="judge agreement with labelled pairs", xlabel="round", ylim=(0, 1), xticks=rounds)
    fig.suptitle(f"campaign {campaign}: green promoted, red rejected")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def data_url(png: bytes) -> str:
    """The PNG as a data URL: the Prefect UI shows it inside a markdown artifact, no file server needed."""
    return "data:image/png;base64," + base64.b64encode(png).decode()


def campaign_markdown(
    rows: list[dict[str, Any]], campaign: str, image: str, paused: str | None = None
) -> str:
    """The report's markdown; `image` is where it finds the plot (a file name, or `data_url(png)`);
    `paused`, why the campaign plans no round (sao_core.campaign.planning), shown first."""
    counts = {s: sum(r["status"] == s for r in rows) for s in ("promoted", "failed", "superseded")}
    lines = [f"# Campaign {campaign}\n"]
    if paused:
        lines.append(f"> **Campaign paused:** {paused}\n")
    lines += [
        f"{len(rows)} decided round(s); {counts['promoted']} promoted, {counts['failed']} failed, "
        f"{counts['superseded']} superseded.\n",
        "| round | started from | pairs | judge valid / agreement | vs previous | vs original | downstream | outcome |",
        "|---:|---|---:|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['round']} | `{r['started_from']}` | {r['pairs'] if r['pairs'] is not None else '-'} | "
            f"{_judge(r)} | {_comparison(r, 'current')} | "
            f"{_comparison(r, 'original')} | {_downstream(r)} | **{r['status']}**: {r['why']} |"
        )
    lines.append(f"\n![campaign plot]({image})\n")
    return "\n".join(lines) + "\n"
