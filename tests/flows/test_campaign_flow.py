"""Campaigns on the test harness: rounds from the last promoted model, the promotion gate acting, a
person's approval answered through Prefect's API, and the campaign report as a UI artifact.

The tiny recipe: the scripted engine writes the data, the tiny Llama trains (LoRA, merged into a full
model so the next round loads one folder). A rule that cannot fail (`min_win_rate_lower=0`,
`min_judge_agreement=0`) makes a round promote; the default rule on identical answers rejects it.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from sao_core.campaign import ledger, planning
from sao_core.campaign.campaign_report import campaign_rows
from sao_core.store import shards, storage

ROOT = Path(__file__).parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
PROMOTE_ALWAYS = [
    "promotion.min_win_rate_lower=0.0",
    "promotion.min_judge_agreement=0.0",
    "promotion.min_judged=1",
    "promotion.min_valid_share=0.0",
]
pytestmark = pytest.mark.tier1


def _campaign(tmp_path: Path, rounds: int, *overrides: str) -> dict[str, Any]:
    from flows.campaign import sao_campaign

    state = sao_campaign(
        TINY, [f"run.root={tmp_path}", "evaluation.n=12", *overrides], rounds=rounds, return_state=True
    )
    assert state.is_completed(), state
    return state.result()


def _resolved(round_dir: str) -> dict[str, Any]:
    return yaml.safe_load(storage.read_text(storage.join(round_dir, "resolved_config.yaml")))


def test_round_two_starts_from_round_one_and_is_judged_against_both(
    tmp_path: Path, prefect_api: None
) -> None:
    result = _campaign(tmp_path, 2, *PROMOTE_ALWAYS)
    first, second = result["rounds"]
    assert (first["round"], first["status"], second["round"], second["status"]) == (
        1,
        "promoted",
        2,
        "promoted",
    )

    promoted = ledger.history(str(tmp_path), "tiny")
    assert [p.round for p in promoted] == [1, 2]
    one = promoted[0]
    assert one.model_path.endswith("/full") and one.model_adapter is None  # merged: one loadable folder
    assert Path(one.model_path).is_dir() and (Path(one.model_path) / "config.json").is_file()

    # Round 2 ran with round 1's model: in its config, and in every manifest the engine wrote.
    settings = _resolved(second["round_dir"])
    assert settings["model"]["path"] == one.model_path and settings["model"]["adapter"] is None
    assert settings["training"]["merge"] is True
    assert settings["evaluation"]["original"] == "bundled:tiny-random-llama"
    for stage in ("prompts", "responses", "judgements"):
        manifest = shards.read_stage_manifest(storage.join(second["round_dir"], stage))
        assert manifest["model"] == one.model_path, stage
    # {model}/eval/{evaluation settings hash}/ (layout.evaluation_url), the folder the round's result names.
    eval_dir = second["evaluation"]["url"]
    assert eval_dir.startswith(storage.join(promoted[1].model, "eval") + "/")
    evaluation = storage.read_json(storage.join(eval_dir, "manifest.json"))
    assert set(evaluation["comparisons"]) == {"current", "original"}
    assert evaluation["comparisons"]["current"]["baseline"] == one.model_path
    assert evaluation["comparisons"]["original"]["baseline"] == "bundled:tiny-random-llama"

    # Round 1 started from the configured model and had no second baseline.
    assert _resolved(first["round_dir"])["model"]["path"] == "bundled:tiny-random-llama"
    # Personas of round 2 are new ones.
    ids = [
        {r["persona_id"] for r in shards.read_stage_rows(storage.join(r["round_dir"], "personas"), "jsonl")}
        for r in (first, second)
    ]
    assert ids[0] and ids[1] and not ids[0] & ids[1]

    report = Path(result["report"])
    text = report.read_text()
    assert "| 1 |" in text and "| 2 |" in text and "promoted" in text
    assert (report.parent / "campaign_report.png").read_bytes().startswith(b"\x89PNG")


def test_a_rejected_round_leaves_current_and_says_which_rule(tmp_path: Path, prefect_api: None) -> None:
    result = _campaign(tmp_path, 1, "promotion.min_judge_agreement=0.99")
    (only,) = result["rounds"]
    assert only["status"] == "rejected" and "judge agreement" in only["why"] and "0.99" not in only["why"]
    assert "promotion.min_judge_agreement=99.0%" in only["why"]
    assert ledger.current(str(tmp_path), "tiny") is None
    outcome = storage.read_json(storage.join(only["round_dir"], "outcome.json"))
    assert outcome["status"] == "rejected" and outcome["promotion_seq"] is None
    failed = [c["rule"] for c in outcome["checks"] if not c["passed"]]
    assert "judge agreement" in failed
    report = storage.read_text(storage.join(only["round_dir"], "report.md"))
    assert "## Promotion: rejected" in report and "FAIL: judge agreement" in report
    # The next round is round 2, from the configured model again (nothing promoted).
    again = _campaign(tmp_path, 1, "promotion.min_judge_agreement=0.99")
    assert again["rounds"][0]["round"] == 2
    assert _resolved(again["rounds"][0]["round_dir"])["model"]["path"] == "bundled:tiny-random-llama"


def _paused_run(timeout_s: float = 300) -> Any:
    """The flow run waiting for a person (Paused), once there is one."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterStateName

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(state=dict(name=FlowRunFilterStateName(any_=["Paused"])))
            )
            if runs:
                return runs[0]
            time.sleep(0.5)
    raise AssertionError("no flow run paused for approval")


def _round_in_background(tmp_path: Path, *overrides: str) -> tuple[threading.Thread, dict[str, Any]]:
    from flows.sao_round import sao_round

    box: dict[str, Any] = {}

    def run() -> None:
        box["state"] = sao_round(
            TINY,
            [
                f"run.root={tmp_path}",
                "evaluation.n=6",
                "promotion.approval=human",
                *PROMOTE_ALWAYS,
                *overrides,
            ],
            continue_campaign=True,
            return_state=True,
        )

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


@pytest.mark.parametrize(("approve", "status"), [(True, "promoted"), (False, "rejected")])
def test_a_person_approves_or_rejects_in_the_ui(
    tmp_path: Path, prefect_api: None, approve: bool, status: str
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.flow_runs import resume_flow_run

    thread, box = _round_in_background(tmp_path)
    paused = _paused_run()
    with get_client(sync_client=True) as client:
        keys = [
            v.key
            for v in client.filter_flow_run_input(
                flow_run_id=paused.id, key_prefix="paused-approve-round-1", limit=20, exclude_keys=set()
            )
        ]
        description = client.read_flow_run_input(
            flow_run_id=paused.id, key="paused-approve-round-1-description"
        )
    assert keys, "the pause saved no input form"
    assert "Promote round 1?" in description and "judge trust" in description and "Sample" in description
    resume_flow_run(paused.id, run_input={"approve": approve, "reason": "checked the samples"})
    thread.join(timeout=300)
    state = box["state"]
    assert state.is_completed(), state
    outcome = state.result()["outcome"]
    assert outcome["status"] == status
    assert f"{'approved' if approve else 'rejected'} by a person: checked the samples" in outcome["why"]
    promoted = ledger.current(str(tmp_path), "tiny")
    assert (promoted is not None) is approve


def test_no_answer_before_the_timeout_is_a_rejection(tmp_path: Path, prefect_api: None) -> None:
    thread, box = _round_in_background(tmp_path, "promotion.approval_timeout_s=4")
    thread.join(timeout=300)
    state = box["state"]
    assert state.is_completed(), state
    outcome = state.result()["outcome"]
    assert outcome["status"] == "rejected" and "no answer within 4 s" in outcome["why"]
    assert ledger.current(str(tmp_path), "tiny") is None


def _events(resource_prefix: str, wanted: int, timeout_s: float = 60) -> list[dict[str, Any]]:
    """The server's events about resources whose id starts with `resource_prefix`, read back through its
    REST API once `wanted` of them are there (events are written a moment after they are sent)."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventResourceFilter

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            # Built afresh each time: the filter's default window ends when it is made.
            query = EventFilter(resource=EventResourceFilter(id_prefix=[resource_prefix]))
            body = {"filter": query.model_dump(mode="json"), "limit": 50}
            response = client.request("POST", "/events/filter", json=body)
            response.raise_for_status()
            events = response.json()["events"]
            if len(events) >= wanted or time.monotonic() > deadline:
                return events
            time.sleep(0.5)


def test_each_round_outcome_is_a_prefect_event(tmp_path: Path, prefect_api: None) -> None:
    """sao.round.promoted / rejected / superseded / failed, with the round and its campaign as resources,
    emitted by the outcome tasks and read back from a real server through /events/filter."""
    from prefect import flow

    from sao_core.config import config_to_yaml
    from tasks.campaign import record_outcome, record_round_failure
    from tests.core.test_campaign import CAMPAIGN, make_round, round_config

    root = str(tmp_path / "artifacts")
    passed = {"promote": True, "reason": "rule held", "failed": [], "checks": []}
    failed = {"promote": False, "reason": "rule failed", "failed": ["win rate: lost"], "checks": []}

    def ref(round_dir: str, k: int) -> dict[str, Any]:
        return {
            "round_dir": round_dir,
            "config_url": storage.join(round_dir, "resolved_config.yaml"),
            "round": k,
        }

    @flow(name="outcome-events")
    def outcomes() -> list[str]:
        one_dir, one = make_round(root, 1, full=True)
        two_dir, two = make_round(root, 2, full=True)
        three_dir, three = make_round(root, 3, full=True)
        statuses = [
            record_outcome(ref(one_dir, 1), {"url": one}, {}, {}, None, None, passed, {"planned_seq": None}),
            record_outcome(ref(two_dir, 2), {"url": two}, {}, {}, None, None, failed, {"planned_seq": 1}),
            # Planned from no record, but round 1 has promoted since: superseded.
            record_outcome(
                ref(three_dir, 3), {"url": three}, {}, {}, None, None, passed, {"planned_seq": None}
            ),
        ]
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(config_to_yaml(round_config(root, 4)))
        statuses.append(
            record_round_failure(
                str(recipe), [], "quality_gate", "RoundQualityError", "3 pairs", {"planned_seq": 1}
            )
        )
        return [s["status"] for s in statuses]

    assert outcomes() == ["promoted", "rejected", "superseded", "failed"]
    events = _events(f"sao.round.{CAMPAIGN}.", 4)
    by_round = {
        e["resource"]["sao.round"]: e for e in events if e["resource"].get("sao.campaign") == CAMPAIGN
    }
    assert {k: e["event"] for k, e in by_round.items()} == {
        "1": "sao.round.promoted",
        "2": "sao.round.rejected",
        "3": "sao.round.superseded",
        "4": "sao.round.failed",
    }
    four = by_round["4"]
    assert four["resource"]["prefect.resource.id"] == f"sao.round.{CAMPAIGN}.4"
    campaign = [r for r in four["related"] if r.get("prefect.resource.role") == "campaign"]
    assert campaign and campaign[0]["prefect.resource.id"] == f"sao.campaign.{CAMPAIGN}"
    assert four["payload"]["failure"] == {
        "stage": "quality_gate",
        "error": "RoundQualityError",
        "message": "3 pairs",
    }
    assert "planned from and evaluated against the base model" in by_round["3"]["payload"]["why"]


def test_a_failing_campaign_moves_on_then_pauses_instead_of_looping(
    tmp_path: Path, prefect_api: None
) -> None:
    # Issue 17: a round that failed for good (here the quality gate) wrote no outcome, so the next night
    # planned the same round from the same model, served every stage from the cache and failed again.
    from flows.campaign import sao_campaign

    overrides = [f"run.root={tmp_path}", "pairing.min_pairs=100000", "campaign.max_consecutive_failures=2"]
    state = sao_campaign(TINY, overrides, rounds=3, return_state=True)
    assert state.is_failed() and "paused after 2 failed rounds in a row" in str(state.message)
    rows = campaign_rows(str(tmp_path), "tiny")
    assert [(r["round"], r["status"]) for r in rows] == [(1, "failed"), (2, "failed")]
    assert (
        rows[0]["failure"]["stage"] == "quality_gate" and rows[0]["failure"]["error"] == "RoundQualityError"
    )
    seeds = [_resolved(r["round_dir"])["run"]["seed"] for r in rows]
    assert seeds[1] == seeds[0] + 1  # the next round is a new draw, not the cached failure again
    report = (tmp_path / "tiny" / "campaign_report.md").read_text()
    assert "**Campaign paused:**" in report and "quality_gate" in report
    # A person resumes: the next plan is round 3.
    planning.resume(str(tmp_path), "tiny", who="ana", why="lowered the gate")
    assert planning.plan_next(str(tmp_path), "tiny", 0, 2).round == 3
