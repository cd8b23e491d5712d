"""Campaign state (sao_core/campaign/ledger.py): promotion records, CURRENT, rollback, and the model a round starts
from, on a local folder and on a real S3 endpoint, with promotions that really race (threads and processes
released together by a barrier)."""

from __future__ import annotations

import json
import multiprocessing
import threading

import pytest

from sao_core.campaign import ledger, outcomes, planning
from sao_core.campaign.ledger import Promotion
from sao_core.config import build_config
from sao_core.errors import (
    CampaignError,
    FanoutError,
    LeaseLost,
    ModelNotFoundError,
    RoundQualityError,
    StorageConflict,
    StorageError,
    TrainingError,
    TransientStorageError,
)
from sao_core.store import atomic, shards, storage, trained
from sao_core.store.layout import prepare_round, stage_url
from sao_core.store.shards import ShardManifest
from tests.core.fake_training import fake_training_run

CAMPAIGN = "camp"


def round_config(root: str, k: int, **model):
    return build_config(
        {
            "run": {"root": root, "campaign": CAMPAIGN, "round": k},
            "engine": {"name": "fake"},
            "model": {"path": "bundled:tiny-random-llama", **model},
        }
    )


def pair_row(k: int) -> dict:
    return {
        "prompt": [{"role": "user", "content": f"question of round {k}"}],
        "chosen": [{"role": "assistant", "content": "a good answer"}],
        "rejected": [{"role": "assistant", "content": "meh"}],
        "persona_id": "pe-1",
        "prompt_id": f"pr-{k}",
        "chosen_response_id": "rs-a",
        "rejected_response_id": "rs-b",
        "raw_judge_output": "ranking: 1 > 2",
        "round": k,
        "config_hash": "abc",
    }


def make_round(root: str, k: int, full: bool = False, **model) -> tuple[str, str]:
    """A round folder with its resolved config and a one-row pairs stage, and its trained model."""
    cfg = round_config(root, k, **model)
    round_dir = prepare_round(cfg)
    pairs = stage_url(round_dir, "pairs")
    entry = shards.write_shard(pairs, 0, [pair_row(k)], [], "jsonl", ShardManifest("pairs", 0, 1))
    shards.write_stage_manifest(pairs, "pairs", [entry], format="jsonl")
    return round_dir, fake_training_run(cfg, round_dir, full=full)


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.tier1)])
def root(request, tmp_path):
    """The artifact root: a local folder, or a fresh bucket on the moto S3 server."""
    if request.param == "s3":
        return f"{request.getfixturevalue('s3_env')}/artifacts"
    return str(tmp_path / "artifacts")


def test_promote_writes_a_record_current_and_history(root):
    round_dir, model = make_round(root, 1)
    assert ledger.current(root, CAMPAIGN) is None and ledger.history(root, CAMPAIGN) == []

    record = ledger.promote(root, CAMPAIGN, round_dir, model, who="ana", why="won the gate: 61%")
    assert (record.seq, record.action, record.round, record.who, record.why) == (
        1,
        "promote",
        1,
        "ana",
        "won the gate: 61%",
    )
    assert record.model == storage.normalise_url(model) and record.round_dir == round_dir
    assert record.model_path == "bundled:tiny-random-llama"  # LoRA: the next round loads base + adapter
    assert record.model_adapter == storage.join(record.model, "adapter")
    assert record.parent is None and record.parent_seq is None and len(record.model_sha) == 64
    curl = ledger.campaign_url(root, CAMPAIGN)
    assert storage.read_json(storage.join(curl, "promotions", "000001.json")) == record.to_dict()
    assert storage.read_json(storage.join(curl, "CURRENT")) == record.to_dict()
    assert ledger.current(root, CAMPAIGN) == record

    round2, model2 = make_round(root, 2)
    second = ledger.promote(root, CAMPAIGN, round2, model2, who="bo", why="round 2 won")
    assert (second.seq, second.parent, second.parent_seq) == (2, record.model, 1)
    assert ledger.history(root, CAMPAIGN) == [record, second]
    lines = storage.read_text(storage.join(curl, "history.jsonl")).splitlines()
    assert [json.loads(line)["seq"] for line in lines] == [1, 2]
    assert "won the gate: 61%" in ledger.format_history(second, [record, second], CAMPAIGN)


def test_promoting_the_current_model_again_writes_nothing(tmp_path):
    root = str(tmp_path)
    round_dir, model = make_round(root, 1)
    first = ledger.promote(root, CAMPAIGN, round_dir, model, why="first")
    again = ledger.promote(root, CAMPAIGN, round_dir, model + "/", why="a retried promotion step")
    assert again == first and len(ledger.history(root, CAMPAIGN)) == 1


def test_a_full_model_is_loaded_as_model_path(tmp_path):
    root = str(tmp_path)
    round_dir, model = make_round(root, 1, full=True)
    record = ledger.promote(root, CAMPAIGN, round_dir, storage.join(model, "full"), why="full fine-tune")
    assert record.model == model  # the weights folder given resolves to its run
    assert (record.model_path, record.model_adapter) == (storage.join(model, "full"), None)


def test_an_adapter_trained_on_top_of_an_adapter_is_refused(tmp_path):
    root = str(tmp_path)
    round_dir, model = make_round(root, 2, adapter=str(tmp_path / "earlier-adapter"))
    with pytest.raises(CampaignError, match=r"merged in.*training\.merge: true"):
        ledger.promote(root, CAMPAIGN, round_dir, model, why="x")
    round_dir, model = make_round(root, 3, full=True, adapter=str(tmp_path / "earlier-adapter"))
    assert ledger.promote(root, CAMPAIGN, round_dir, model, why="merged").model_adapter is None


def test_a_missing_or_unfinished_model_is_refused(tmp_path):
    root = str(tmp_path)
    round_dir, model = make_round(root, 1)
    with pytest.raises(ModelNotFoundError, match=r"no manifest\.json"):
        ledger.promote(root, CAMPAIGN, round_dir, str(tmp_path / "nowhere"), why="x")
    unfinished = storage.read_json(storage.join(model, "manifest.json"))
    storage.write_json(storage.join(model, "manifest.json"), {**unfinished, "complete": False})
    with pytest.raises(ModelNotFoundError, match="does not say a training run finished"):
        ledger.promote(root, CAMPAIGN, round_dir, model, why="x")
    storage.write_json(storage.join(model, "manifest.json"), unfinished)
    storage.remove(storage.join(model, "adapter", "adapter_model.safetensors"))
    with pytest.raises(ModelNotFoundError, match=r"adapter is missing or incomplete"):
        ledger.promote(root, CAMPAIGN, round_dir, model, why="x")
    other_round, other_model = make_round(root, 2)
    with pytest.raises(CampaignError, match="was trained on the pairs of"):
        ledger.promote(root, CAMPAIGN, round_dir, other_model, why="x")
    with pytest.raises(CampaignError, match="needs a reason"):
        ledger.promote(root, CAMPAIGN, other_round, other_model, why="  ")
    assert ledger.history(root, CAMPAIGN) == []  # nothing was recorded


def test_round_model_finds_the_rounds_finished_run(tmp_path):
    root = str(tmp_path)
    round_dir, model = make_round(root, 1)
    assert planning.round_model(round_dir) == model
    storage.remove(storage.join(model, "manifest.json"))
    with pytest.raises(ModelNotFoundError, match="no finished training run"):
        planning.round_model(round_dir)


def test_rollback_restores_the_previous_model_and_can_go_further(root):
    records = []
    for k in (1, 2, 3):
        round_dir, model = make_round(root, k)
        records.append(ledger.promote(root, CAMPAIGN, round_dir, model, why=f"round {k}"))
    a, b, c = records

    back = ledger.rollback(root, CAMPAIGN, who="ana", why="round 3 regressed")
    assert (back.seq, back.action, back.to_seq, back.parent_seq) == (4, "rollback", 2, 3)
    assert (back.model, back.model_path, back.model_adapter, back.round) == (
        b.model,
        b.model_path,
        b.model_adapter,
        2,
    )
    assert ledger.current(root, CAMPAIGN) == back

    further = ledger.rollback(root, CAMPAIGN, why="round 2 too")
    assert (further.to_seq, further.model) == (1, a.model)
    with pytest.raises(CampaignError, match="nothing to roll back to"):
        ledger.rollback(root, CAMPAIGN, why="and round 1")

    forward = ledger.rollback(root, CAMPAIGN, why="round 3 was fine after all", to_seq=3)
    assert (forward.model, forward.to_seq) == (c.model, 3)
    with pytest.raises(CampaignError, match="already current"):
        ledger.rollback(root, CAMPAIGN, why="x", to_seq=3)
    with pytest.raises(CampaignError, match="has no record 42"):
        ledger.rollback(root, CAMPAIGN, why="x", to_seq=42)
    assert [r.seq for r in ledger.history(root, CAMPAIGN)] == [1, 2, 3, 4, 5, 6]


def test_rollback_refuses_a_model_rewritten_since_it_was_promoted(tmp_path):
    root = str(tmp_path)
    r1, m1 = make_round(root, 1)
    ledger.promote(root, CAMPAIGN, r1, m1, why="1")
    r2, m2 = make_round(root, 2)
    ledger.promote(root, CAMPAIGN, r2, m2, why="2")
    storage.write_bytes(storage.join(m1, "adapter", "adapter_model.safetensors"), b"retrained in place")
    with pytest.raises(CampaignError, match="changed since record 1 promoted it"):
        ledger.rollback(root, CAMPAIGN, why="back")
    with pytest.raises(CampaignError, match="no promotion to roll back"):
        ledger.rollback(root, "empty", why="back")


def test_a_rollback_stops_when_someone_promotes_meanwhile(tmp_path, monkeypatch):
    root = str(tmp_path)
    for k in (1, 2):
        round_dir, model = make_round(root, k)
        ledger.promote(root, CAMPAIGN, round_dir, model, why=f"round {k}")
    r3, m3 = make_round(root, 3)
    real = trained.weights_key

    def promote_meanwhile(url):  # runs after the rollback chose its target, before it writes
        monkeypatch.setattr(trained, "weights_key", real)
        ledger.promote(root, CAMPAIGN, r3, m3, why="round 3, promoted by the nightly flow")
        return real(url)

    monkeypatch.setattr(trained, "weights_key", promote_meanwhile)
    with pytest.raises(StorageConflict, match="moved on to record 3"):
        ledger.rollback(root, CAMPAIGN, why="round 2 regressed")
    assert [r.action for r in ledger.history(root, CAMPAIGN)] == ["promote"] * 3


@pytest.mark.parametrize(
    "damage",
    ["garbage", "truncated", "older record", "missing"],
)
def test_a_damaged_current_is_detected_and_repaired_from_the_records(root, damage, caplog):
    for k in (1, 2):
        round_dir, model = make_round(root, k)
        latest = ledger.promote(root, CAMPAIGN, round_dir, model, why=f"round {k}")
    current_url = storage.join(ledger.campaign_url(root, CAMPAIGN), "CURRENT")
    text = storage.read_text(current_url)
    if damage == "garbage":
        storage.write_text(current_url, "\x00 not a promotion")
    elif damage == "truncated":
        storage.write_text(current_url, text[: len(text) // 2])
    elif damage == "older record":
        storage.write_json(current_url, ledger.history(root, CAMPAIGN)[0].to_dict())
    else:
        storage.remove(current_url)

    assert ledger.current(root, CAMPAIGN, repair=False) == latest  # the records win
    assert ledger.current(root, CAMPAIGN) == latest
    assert "rewritten from record 2" in caplog.text
    assert Promotion.from_dict(storage.read_json(current_url), current_url) == latest


def test_current_without_records_is_an_error_not_a_silent_base_model(tmp_path):
    root = str(tmp_path)
    storage.write_text(storage.join(ledger.campaign_url(root, CAMPAIGN), "CURRENT"), "{}")
    with pytest.raises(StorageError, match="holds no promotion record"):
        ledger.current(root, CAMPAIGN)
    with pytest.raises(CampaignError, match="campaign name"):
        ledger.current(root, "../elsewhere")


def test_start_model_round_one_from_the_config_later_rounds_from_current(tmp_path):
    root = str(tmp_path)
    assert planning.start_model(round_config(root, 1)) == ("bundled:tiny-random-llama", None)
    assert planning.start_model(round_config(root, 2)) == ("bundled:tiny-random-llama", None)  # none promoted
    round_dir, model = make_round(root, 1)
    record = ledger.promote(root, CAMPAIGN, round_dir, model, why="round 1 won")
    assert planning.start_model(round_config(root, 1)) == ("bundled:tiny-random-llama", None)
    assert planning.start_model(round_config(root, 2)) == (record.model_path, record.model_adapter)
    assert record.model_adapter == storage.join(model, "adapter")


# --- races ---------------------------------------------------------------------------------------------


def _wait_at_first_write(barrier, conflicts: list[str]):
    """atomic.write_bytes_exclusive, but the first call of each writer waits for the others: every writer
    has read the same latest record and tries the same number at the same moment."""
    real = atomic.write_bytes_exclusive
    waited = threading.local()

    def write(url: str, data: bytes) -> None:
        if not getattr(waited, "done", False):
            waited.done = True
            barrier.wait(timeout=60)
        try:
            real(url, data)
        except StorageConflict:
            conflicts.append(url)
            raise

    return write


def _check_both_recorded(root: str, models: list[str]) -> None:
    records = ledger.history(root, CAMPAIGN)
    assert [r.seq for r in records] == [1, 2]
    assert sorted(r.model for r in records) == sorted(storage.normalise_url(m) for m in models)
    assert (
        records[1].parent == records[0].model and records[1].parent_seq == 1
    )  # the loser built on the winner
    assert ledger.current(root, CAMPAIGN) == records[1]
    current_url = storage.join(ledger.campaign_url(root, CAMPAIGN), "CURRENT")
    assert storage.read_json(current_url) == records[1].to_dict()


def test_two_promotions_racing_in_threads_are_both_recorded_in_order(root, monkeypatch):
    rounds = [make_round(root, k) for k in (1, 2)]
    barrier, conflicts = threading.Barrier(2), []
    monkeypatch.setattr(atomic, "write_bytes_exclusive", _wait_at_first_write(barrier, conflicts))
    results: list[Promotion | BaseException] = []

    def run(round_dir: str, model: str) -> None:
        try:
            results.append(ledger.promote(root, CAMPAIGN, round_dir, model, why="race"))
        except BaseException as e:
            results.append(e)

    threads = [threading.Thread(target=run, args=r) for r in rounds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(isinstance(r, Promotion) for r in results), results
    assert len(conflicts) == 1 and conflicts[0].endswith("promotions/000001.json")  # a real collision
    _check_both_recorded(root, [m for _, m in rounds])


def _promote_in_child(root, round_dir, model, barrier, queue) -> None:
    """A second process promoting: spawned, so it shares nothing with the test but the store."""
    conflicts: list[str] = []
    atomic.write_bytes_exclusive = _wait_at_first_write(barrier, conflicts)
    try:
        record = ledger.promote(root, CAMPAIGN, round_dir, model, why="race between processes")
        queue.put(("ok", record.seq, conflicts))
    except BaseException as e:
        queue.put(("error", repr(e), conflicts))


def test_two_promotions_racing_in_processes_are_both_recorded_in_order(root):
    rounds = [make_round(root, k) for k in (1, 2)]
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_promote_in_child, args=(root, *r, barrier, queue)) for r in rounds]
    for p in procs:
        p.start()
    outcomes = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sorted(o[0] for o in outcomes) == ["ok", "ok"], outcomes
    assert sorted(o[1] for o in outcomes) == [1, 2]
    assert sum(len(o[2]) for o in outcomes) == 1  # one of them found record 1 taken and took 2
    _check_both_recorded(root, [m for _, m in rounds])


def test_a_writer_that_keeps_losing_gives_up_clearly(tmp_path, monkeypatch):
    root = str(tmp_path)
    round_dir, model = make_round(root, 1)

    def always_taken(url: str, data: bytes) -> None:
        raise StorageConflict(f"{url} already exists")

    monkeypatch.setattr(atomic, "write_bytes_exclusive", always_taken)
    with pytest.raises(StorageConflict, match="gave up after 3 tries"):
        ledger.promote(root, CAMPAIGN, round_dir, model, why="x", attempts=3)


@pytest.mark.tier1
def test_a_model_finished_by_another_process_is_found_despite_cached_listings(s3_env):
    """s3fs answers `exists` from folder listings it cached; a promotion must see what a training
    process wrote since (here: another client, sharing nothing with this one)."""
    import s3fs

    root = f"{s3_env}/artifacts"
    round_dir, model = make_round(root, 1)
    manifest = storage.read_bytes(storage.join(model, "manifest.json"))
    storage.remove(storage.join(model, "manifest.json"))
    assert storage.list_files(model, "*") and not storage.exists(storage.join(model, "manifest.json"))
    s3fs.S3FileSystem(skip_instance_cache=True).pipe_file(
        storage.join(model.removeprefix("s3://"), "manifest.json"), manifest
    )
    assert ledger.promote(root, CAMPAIGN, round_dir, model, why="trained elsewhere").seq == 1


# --- issue 17: only campaign rounds promote, compare-and-set, every round ends with an outcome ----------


def _passed_decision() -> dict:
    return {
        "promote": True,
        "reason": "rule held",
        "failed": [],
        "checks": [{"rule": "win rate", "passed": True, "detail": "won"}],
    }


def _ref(round_dir: str) -> dict:
    return {"round_dir": round_dir, "config_url": storage.join(round_dir, "resolved_config.yaml"), "round": 1}


def test_a_standalone_round_says_would_be_promoted_and_never_moves_current(tmp_path, monkeypatch):
    # Issue 17: `sao run` (continue_campaign=False) ran record_outcome -> ledger.promote, without the
    # campaign lock, after comparing only with the recipe's model: a round-1 model that beat the base
    # replaced a round-5 CURRENT.
    import tasks.campaign

    monkeypatch.setattr(tasks.campaign, "emit_event", lambda **kw: None)
    root = str(tmp_path / "artifacts")
    for k in range(1, 6):
        round_dir, model = make_round(root, k, full=True)
        ledger.promote(root, CAMPAIGN, round_dir, model, why=f"campaign round {k}")
    five = ledger.current(root, CAMPAIGN)
    assert five is not None and five.round == 5
    standalone_dir, standalone_model = make_round(str(tmp_path / "artifacts"), 1, full=True, revision="other")
    outcome = tasks.campaign.record_outcome.fn(
        _ref(standalone_dir), {"url": standalone_model}, {}, {}, None, None, _passed_decision()
    )
    assert outcome["status"] == "would be promoted" and outcome["standalone"] is True
    assert "only campaign rounds move CURRENT" in outcome["why"]
    assert ledger.current(root, CAMPAIGN) == five
    # It is no campaign round either: planning does not count it.
    assert planning.plan_next(root, CAMPAIGN, 0, 3).round == 1


def test_promotion_is_compare_and_set_against_the_planned_record(tmp_path):
    # Issue 17: ledger.promote appended on top of whatever was latest, so a rollback made while a round
    # ran was undone, and the new record's parent was a model the round was never compared with.
    root = str(tmp_path / "artifacts")
    one_dir, one = make_round(root, 1, full=True)
    two_dir, two = make_round(root, 2, full=True)
    ledger.promote(root, CAMPAIGN, one_dir, one, why="round 1")
    ledger.promote(root, CAMPAIGN, two_dir, two, why="round 2")
    plan = planning.plan_next(root, CAMPAIGN, 0, 3)
    assert plan.start_seq == 2
    three_dir, three = make_round(root, 3, full=True)
    # While round 3 runs, a person rolls back to round 1.
    back = ledger.rollback(root, CAMPAIGN, who="ana", why="round 2 regressed")
    cfg = round_config(root, 3)
    outcome = outcomes.conclude_round(
        cfg,
        three_dir,
        three,
        None,
        None,
        None,
        None,
        _passed_decision(),
        campaign_round=True,
        planned_seq=plan.start_seq,
    )
    assert outcome["status"] == "superseded" and outcome["promotion_seq"] is None
    assert "planned from and evaluated against record 2" in outcome["why"] and "rollback" in outcome["why"]
    assert ledger.current(root, CAMPAIGN) == back  # the rollback stands
    # Planned from the rollback, the next round promotes, and its parent is the model it was compared with.
    plan = planning.plan_next(root, CAMPAIGN, 0, 3)
    assert (plan.round, plan.start_seq) == (4, back.seq)
    four_dir, four = make_round(root, 4, full=True)
    outcome = outcomes.conclude_round(
        round_config(root, 4),
        four_dir,
        four,
        None,
        None,
        None,
        None,
        _passed_decision(),
        campaign_round=True,
        planned_seq=plan.start_seq,
    )
    record = ledger.current(root, CAMPAIGN)
    assert outcome["status"] == "promoted" and record is not None and record.parent_seq == back.seq
    assert record.parent == back.model == one and outcome["promotion_seq"] == record.seq


def test_a_lost_campaign_lock_supersedes_the_promotion(tmp_path):
    root = str(tmp_path / "artifacts")
    one_dir, one = make_round(root, 1, full=True)

    def lost() -> None:
        raise LeaseLost("the campaign lock is now held by flow run other")

    outcome = outcomes.conclude_round(
        round_config(root, 1),
        one_dir,
        one,
        None,
        None,
        None,
        None,
        _passed_decision(),
        campaign_round=True,
        planned_seq=None,
        guard=lost,
    )
    assert outcome["status"] == "superseded" and "held by flow run other" in outcome["why"]
    assert ledger.current(root, CAMPAIGN) is None


def test_a_failed_round_is_passed_with_new_personas_and_seed_and_the_campaign_pauses(tmp_path):
    # Issue 17: a round that failed for good wrote no outcome, so the next night planned the same round
    # from the same model, served every stage from the cache and failed the same way, for ever.
    root = str(tmp_path / "artifacts")
    cfg = round_config(root, 1)
    one_dir = prepare_round(cfg)
    outcomes.record_failure(
        cfg, one_dir, "quality_gate", "RoundQualityError", "3 pairs < 8", campaign_round=True
    )
    plan = planning.plan_next(root, CAMPAIGN, 7, max_consecutive_failures=2)
    assert (plan.round, plan.seed, plan.paused) == (2, 8, None)
    row = storage.read_json(storage.join(one_dir, "outcome.json"))
    assert row["status"] == "failed"
    assert row["failure"] == {"stage": "quality_gate", "error": "RoundQualityError", "message": "3 pairs < 8"}
    cfg2 = round_config(root, 2)
    outcomes.record_failure(
        cfg2, prepare_round(cfg2), "train_policy", "TrainingError", "rank 0 died", campaign_round=True
    )
    plan = planning.plan_next(root, CAMPAIGN, 7, max_consecutive_failures=2)
    assert plan.consecutive_failures == 2 and plan.paused is not None
    assert (
        "paused after 2 failed rounds in a row" in plan.paused and "TrainingError: rank 0 died" in plan.paused
    )
    from sao_core.campaign.campaign_report import campaign_markdown, campaign_rows

    text = campaign_markdown(campaign_rows(root, CAMPAIGN), CAMPAIGN, "x.png", plan.paused)
    assert "**Campaign paused:**" in text and "2 failed" in text
    planning.resume(root, CAMPAIGN, who="ana", why="fixed the judge")
    plan = planning.plan_next(root, CAMPAIGN, 7, max_consecutive_failures=2)
    assert (plan.round, plan.seed, plan.paused, plan.consecutive_failures) == (3, 9, None, 0)


def test_a_crashed_round_resumes_and_one_that_promoted_before_crashing_finds_its_promotion(tmp_path):
    root = str(tmp_path / "artifacts")
    one_dir, one = make_round(root, 1, full=True)
    # Round 1 crashed before its outcome: planned again as round 1, from the config's model.
    assert (
        planning.plan_next(root, CAMPAIGN, 0, 3).round,
        planning.plan_next(root, CAMPAIGN, 0, 3).start,
    ) == (1, None)
    # It promoted, then crashed before writing its outcome: still round 1, from the same (no) record.
    ledger.promote(root, CAMPAIGN, one_dir, one, why="round 1", expect_seq=None)
    plan = planning.plan_next(root, CAMPAIGN, 0, 3)
    assert (plan.round, plan.start_seq) == (1, None)
    outcome = outcomes.conclude_round(
        round_config(root, 1),
        one_dir,
        one,
        None,
        None,
        None,
        None,
        _passed_decision(),
        campaign_round=True,
        planned_seq=plan.start_seq,
    )
    assert outcome["status"] == "promoted" and outcome["promotion_seq"] == 1
    assert len(ledger.history(root, CAMPAIGN)) == 1


@pytest.mark.parametrize(
    ("error", "permanent"),
    [
        (RoundQualityError("too few pairs"), True),
        (FanoutError("shards 3, 4 missing"), True),
        (TrainingError("rank 0 died"), True),
        (ModelNotFoundError("no such model"), True),
        (CampaignError("an adapter on an adapter"), True),
        (ValueError("not ours: an outage of the orchestrator, say"), False),
        (TransientStorageError("S3 did not answer"), False),
        (LeaseLost("lost"), False),
        (KeyboardInterrupt(), False),
    ],
)
def test_which_failures_are_for_good(error, permanent):
    assert outcomes.permanent_failure(error) is permanent


def test_the_round_report_says_what_the_outcome_was_not_only_the_rule():
    from sao_core.campaign.round_report import format_round_report

    decision = {
        "promote": True,
        "reason": "rule held",
        "checks": [{"rule": "win rate", "passed": True, "detail": "won"}],
    }
    shown = {**decision, "status": "would be promoted", "why": "every rule held (a standalone round: ...)"}
    text = format_round_report("memory://r", {}, promotion=shown)
    assert "## Promotion: would be promoted" in text and "a standalone round" in text
    assert "## Promotion: promoted" in format_round_report("memory://r", {}, promotion=decision)
