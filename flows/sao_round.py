"""One SAO round as a Prefect flow, in the order of the paper's algorithm, ending in the promotion gate.

    sao run --config configs/cpu-smollm2.yaml [--set personas.n=8 ...]    # flows/cli.py
    sao_round("configs/cpu-smollm2.yaml", ["personas.n=8"])                # from Python
    sao_round(config, overrides, continue_campaign=True)                   # the campaign's next round

With no PREFECT_API_URL the run uses Prefect's temporary local server; with it set, the run shows in
that server's UI. Every stage is a retried, cached task; see tasks/. With `continue_campaign` the round
is the campaign's next one: its number and the model it starts from come from the campaign's record
(tasks/campaign.py), which the nightly deployment and `sao campaign` use.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.runtime import flow_run
from prefect.states import Running

from sao_core.campaign.outcomes import permanent_failure
from sao_core.store.locks import campaign_lock
from tasks.artifacts import result_storage, with_result_storage
from tasks.campaign import (
    campaign_paused,
    campaign_report_task,
    plan_round,
    promotion_gate,
    record_outcome,
    record_round_failure,
)
from tasks.config import check_config, config_result, resolve_config
from tasks.downstream import downstream as downstream_task
from tasks.engines import free_engines
from tasks.evaluation import evaluate
from tasks.gate import quality_gate
from tasks.judging import judge_responses
from tasks.pairing import build_pairs
from tasks.personas import sample_personas
from tasks.prompts import synthesize_prompts
from tasks.report import approval_description, write_report
from tasks.responses import generate_responses
from tasks.training import train_policy


class Approval(RunInput):
    """The form the Prefect UI shows when a round waits for a person (promotion.approval: human)."""

    approve: bool = False
    reason: str = ""


def ask_for_approval(ref: dict[str, Any], decision: dict[str, Any], description: str) -> dict[str, Any]:
    """Pause until a person approves or rejects in the UI; no answer in time means rejected."""
    logger = get_run_logger()
    timeout = int(ref["approval_timeout_s"])
    logger.info(
        "round %s passed the promotion rule; waiting up to %d s for a person's approval",
        ref["round"],
        timeout,
    )
    try:
        answer = pause_flow_run(
            wait_for_input=Approval.with_initial_data(description=description, approve=False, reason=""),
            timeout=timeout,
            key=f"approve-round-{ref['round']}",
        )
    except FlowPauseTimeout:
        # The server keeps the run Paused and will no longer resume it: set it running again (forced) so
        # the round records its rejection and reports, instead of ending as a failed run.
        why = f"no answer within {timeout} s: rejected"
        run_id = flow_run.get_id()
        if run_id:
            with get_client(sync_client=True) as client:
                client.set_flow_run_state(UUID(run_id), Running(message=why), force=True)
        return {**decision, "promote": False, "approval": why}
    verdict = "approved" if answer.approve else "rejected"
    reason = answer.reason.strip() or "no reason given"
    return {**decision, "promote": bool(answer.approve), "approval": f"{verdict} by a person: {reason}"}


@flow(name="sao-round")
def sao_round(
    config: str, overrides: list[str] | None = None, continue_campaign: bool = False
) -> dict[str, Any]:
    """resolve -> personas -> prompts -> responses -> judgements -> pairs -> gate -> train -> evaluate
    -> promotion gate -> outcome -> report"""
    overrides = list(overrides or [])
    if not continue_campaign:
        return _settled(config, overrides, None)
    # A campaign's rounds one at a time, whatever started them (nightly, `sao campaign`, the UI): the
    # next round is planned only once this one has recorded its outcome.
    # The config is checked in a task: a bad one fails the run's first task with its one line.
    run = config_result(check_config(config, overrides))
    holder = f"flow run {flow_run.get_name()} ({flow_run.get_id()})"
    with campaign_lock(run["root"], run["campaign"], holder=holder) as lock:
        plan = plan_round(config, overrides)
        if plan["paused"]:
            campaign_report_task(config, overrides)
            campaign_paused(config, overrides, plan["paused"])  # raises: the run fails with the reason
        # The round promotes only while the campaign's latest record is the one it was planned from and
        # this lock is still its own (tasks/campaign.py record_outcome).
        campaign = {"planned_seq": plan["start_seq"], "lock": {"url": lock.url, "token": lock.token}}
        return _settled(config, overrides + plan["overrides"], campaign)


def _failed_stage(error: BaseException) -> str:
    """The task a round failed in: the outermost frame of the traceback in tasks/ (its function name)."""
    tb = error.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if "/tasks/" in code.co_filename.replace("\\", "/"):
            return code.co_name
        tb = tb.tb_next
    return "flow"


def _settled(config: str, overrides: list[str], campaign: dict[str, Any] | None) -> dict[str, Any]:
    """The round, ending with an outcome record even when it fails for good (the run still fails): the
    campaign's next plan then passes it instead of running it again from the same cache. A crash-like
    error (the store, a lease) leaves no outcome: the next plan resumes the round."""
    try:
        return _round(config, overrides, campaign is not None, campaign)
    except Exception as e:
        if not permanent_failure(e):
            raise
        get_run_logger().error("round failed for good in %s: %s: %s", _failed_stage(e), type(e).__name__, e)
        record_round_failure(config, overrides, _failed_stage(e), type(e).__name__, str(e), campaign)
        if campaign is not None:
            campaign_report_task(config, overrides)
        raise


def data_stages(config: str, overrides: list[str]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The resolved round (with its result storage) and the four stages that write the data, by name:
    personas -> prompts -> responses -> judgements."""
    ref = config_result(resolve_config(config, overrides))
    results = result_storage(ref["root"])
    ref = {**ref, "result_storage": results}
    s = ref["settings"]
    personas = with_result_storage(sample_personas, results)(ref, s["personas"])
    prompts = with_result_storage(synthesize_prompts, results)(ref, s["prompts"], personas["url"])
    responses = with_result_storage(generate_responses, results)(ref, s["responses"], prompts["url"])
    judgements = with_result_storage(judge_responses, results)(ref, s["judgements"], responses["url"])
    return ref, {"personas": personas, "prompts": prompts, "responses": responses, "judgements": judgements}


def _round(
    config: str, overrides: list[str], continue_campaign: bool, campaign: dict[str, Any] | None = None
) -> dict[str, Any]:
    ref, data = data_stages(config, overrides)
    results, s = ref["result_storage"], ref["settings"]
    responses, judgements = data["responses"], data["judgements"]
    pairs = with_result_storage(build_pairs, results)(ref, s["pairs"], judgements["url"], responses["url"])
    quality_gate(ref, pairs, judgements)
    # The data stages' engine (a vLLM child holding most of every GPU it sees) is gone before the
    # trainer's ranks start on the same GPUs (tasks/engines.py: one engine alive at a time).
    free_engines()
    model = with_result_storage(train_policy, results)(ref, s["training"], pairs["url"])
    evaluation = (
        with_result_storage(evaluate, results)(ref, s["evaluation"], model) if ref["evaluate"] else None
    )
    downstream = (
        with_result_storage(downstream_task, results)(ref, s["downstream"], model)
        if ref["downstream"]
        else None
    )
    decision = promotion_gate(ref, evaluation, downstream) if ref["promotion"] else None
    if decision and decision["promote"] and ref["approval"] == "human":
        decision = ask_for_approval(ref, decision, approval_description(ref, evaluation, decision))
    outcome = record_outcome(ref, model, pairs, judgements, evaluation, downstream, decision, campaign)
    stages = {s["stage"]: s for s in (*data.values(), pairs)}
    shown = {**decision, "status": outcome["status"], "why": outcome["why"]} if decision else None
    report = write_report(ref, stages, model, evaluation, shown)
    campaign_report = campaign_report_task(config, overrides) if continue_campaign else None
    return {
        "round_dir": ref["round_dir"],
        "round": ref["round"],
        "report": report,
        "model": model["url"],
        "evaluation": evaluation,
        "outcome": outcome,
        "campaign_report": campaign_report,
    }
