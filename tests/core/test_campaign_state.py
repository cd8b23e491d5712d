"""Campaign state under random histories (hypothesis's stateful testing), at the sao_core level: planning
(sao_core/campaign/planning.py), rounds that pass, fail their rule, fail for good, crash (before or after
promoting), run concurrently with another round of the same number, standalone rounds, promotion and
rollback by a person, and a store that fails a promotion's write. Models are fake finished training runs
(tests/core/fake_training.py). After every step:

- CURRENT names a finished model whose record passed the rule in a campaign round or was written by a person
  (a rollback: to such a record);
- the records form one chain: numbered 1..n, each one's parent is the record before it;
- each promotion by a round was compared against its recorded parent (the record the round was planned from);
- no campaign is stuck: the next plan never re-runs a round that has an outcome, and it is paused only after
  campaign.max_consecutive_failures failed rounds in a row.

    .venv/bin/python -m pytest -p no:cacheprovider -s tests/core/test_campaign_state.py   # -s: the figures

Derandomized with fixed example counts, so CI runs the same sequences every time.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
import uuid

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from sao_core.campaign import ledger, outcomes, planning
from sao_core.campaign.campaign_report import read_round_record
from sao_core.config import build_config
from sao_core.errors import CampaignError, StorageConflict, TransientStorageError
from sao_core.store import atomic, shards, trained
from sao_core.store.layout import prepare_round, stage_url
from sao_core.store.shards import ShardManifest
from tests.core.fake_training import fake_training_run

CAMPAIGN = "prop"
MAX_FAILURES = 2
PASSED = {
    "promote": True,
    "reason": "rule held",
    "failed": [],
    "checks": [{"rule": "r", "passed": True, "detail": "ok"}],
}
FAILED_RULE = {
    "promote": False,
    "reason": "rule failed",
    "failed": ["r: lost"],
    "checks": [{"rule": "r", "passed": False, "detail": "lost"}],
}

FIGURES = {"sequences": 0, "steps": 0}


def _round(root: str, k: int, seed: int, variant: int) -> tuple[object, str, str]:
    """A round folder (its config, a one-row pairs stage) and its finished, fake trained full model."""
    cfg = build_config(
        {
            "run": {"root": root, "campaign": CAMPAIGN, "round": k, "seed": seed + 1000 * variant},
            "engine": {"name": "fake"},
            "model": {"path": "bundled:tiny-random-llama"},
        }
    )
    round_dir = prepare_round(cfg)
    pairs = stage_url(round_dir, "pairs")
    row = {
        "prompt": [{"role": "user", "content": f"q{k}"}],
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
        "persona_id": "pe",
        "prompt_id": f"pr-{k}",
        "chosen_response_id": "a",
        "rejected_response_id": "b",
        "raw_judge_output": "1 > 2",
        "round": k,
        "config_hash": "h",
    }
    entry = shards.write_shard(pairs, 0, [row], [], "jsonl", ShardManifest("pairs", 0, 1))
    shards.write_stage_manifest(pairs, "pairs", [entry], format="jsonl")
    return cfg, round_dir, fake_training_run(cfg, round_dir, full=True)


class CampaignMachine(RuleBasedStateMachine):
    root: str = ""  # set per run by the test

    def __init__(self) -> None:
        super().__init__()
        FIGURES["sequences"] += 1
        self.root = f"{type(self).base}/{uuid.uuid4().hex[:8]}"
        self.approved: set[int] = set()  # records that passed the rule in a campaign round, or a person's
        self.compared: dict[
            int, int | None
        ] = {}  # a round's promotion record -> the record it was planned from
        self.models: list[tuple[str, str]] = []  # (round_dir, model) a person may promote
        self.variant = 0

    base: str = ""

    def _plan(self) -> planning.Plan:
        return planning.plan_next(self.root, CAMPAIGN, 0, MAX_FAILURES)

    def _step(self) -> None:
        FIGURES["steps"] += 1

    def _resume_if_paused(self, plan: planning.Plan) -> planning.Plan:
        if plan.paused:
            planning.resume(self.root, CAMPAIGN, who="ops", why="looked into it")
            plan = self._plan()
            assert plan.paused is None
        return plan

    def _conclude(self, cfg, round_dir, model, decision, plan, guard=None) -> dict:
        outcome = outcomes.conclude_round(
            cfg,  # type: ignore[arg-type]
            round_dir,
            model,
            None,
            None,
            None,
            None,
            decision,
            campaign_round=True,
            planned_seq=plan.start_seq,
            guard=guard,
        )
        if outcome["status"] == "promoted":
            self.approved.add(outcome["promotion_seq"])
            self.compared[outcome["promotion_seq"]] = plan.start_seq
        return outcome

    @initialize()
    def start(self) -> None:
        self._step()

    @rule(kind=st.sampled_from(["pass", "reject", "fail", "crash", "crash after promoting", "store error"]))
    def campaign_round(self, kind: str) -> None:
        self._step()
        plan = self._resume_if_paused(self._plan())
        # Variant 0: a round planned again after a crash has the same settings, so the same folder.
        cfg, round_dir, model = _round(self.root, plan.round, plan.seed, 0)
        self.models.append((round_dir, model))
        if kind == "fail":
            outcomes.record_failure(
                cfg, round_dir, "quality_gate", "RoundQualityError", "few pairs", campaign_round=True
            )  # type: ignore[arg-type]
        elif kind == "crash":
            pass  # no outcome: the next plan resumes this round
        elif kind == "crash after promoting":
            record = ledger.promote(
                self.root, CAMPAIGN, round_dir, model, why="rule held", expect_seq=plan.start_seq
            )
            self.approved.add(record.seq)
            self.compared[record.seq] = plan.start_seq
        elif kind == "store error":
            real = atomic.write_bytes_exclusive

            def down(url: str, data: bytes) -> None:
                raise TransientStorageError(f"{url}: the store did not answer")

            atomic.write_bytes_exclusive = down  # type: ignore[assignment]
            try:
                with pytest.raises(TransientStorageError):
                    self._conclude(cfg, round_dir, model, PASSED, plan)
            finally:
                atomic.write_bytes_exclusive = real  # type: ignore[assignment]
            assert not outcomes.permanent_failure(TransientStorageError("x"))
        else:
            outcome = self._conclude(cfg, round_dir, model, PASSED if kind == "pass" else FAILED_RULE, plan)
            assert outcome["status"] == ("promoted" if kind == "pass" else "rejected")

    @rule(lost_lock=st.booleans())
    def two_rounds_at_once(self, lost_lock: bool) -> None:
        """Two runners of the same round number (a lock lost to a frozen holder): one promotes, the other
        finds the campaign moved on (compare-and-set) or its lock gone, and is superseded."""
        self._step()
        plan = self._resume_if_paused(self._plan())
        self.variant += 1
        a = _round(self.root, plan.round, plan.seed, self.variant)
        self.variant += 1
        b = _round(self.root, plan.round, plan.seed, self.variant)
        self.models += [(a[1], a[2]), (b[1], b[2])]
        first = self._conclude(*b, PASSED, plan)
        assert first["status"] == "promoted" or first["status"] == "superseded"

        def lost() -> None:
            raise CampaignError("the campaign lock is another runner's")

        second = self._conclude(*a, PASSED, plan, guard=lost if lost_lock else None)
        if first["status"] == "promoted":
            assert second["status"] == "superseded"

    @rule()
    def standalone_round(self) -> None:
        self._step()
        self.variant += 1
        cfg, round_dir, model = _round(self.root, 1, 99, self.variant)
        before = ledger.current(self.root, CAMPAIGN)
        outcome = outcomes.conclude_round(
            cfg,
            round_dir,
            model,
            None,
            None,
            None,
            None,
            PASSED,
            campaign_round=False,  # type: ignore[arg-type]
        )
        assert outcome["status"] == "would be promoted"
        assert ledger.current(self.root, CAMPAIGN) == before

    @rule(pick=st.integers(min_value=0, max_value=50))
    def person_promotes(self, pick: int) -> None:
        self._step()
        if not self.models:
            return
        round_dir, model = self.models[pick % len(self.models)]
        record = ledger.promote(self.root, CAMPAIGN, round_dir, model, who="ana", why="by hand")
        self.approved.add(record.seq)

    @rule()
    def person_rolls_back(self) -> None:
        self._step()
        # Nothing to roll back to, or already current: refused, which is fine here.
        with contextlib.suppress(CampaignError, StorageConflict):
            ledger.rollback(self.root, CAMPAIGN, who="ana", why="regressed")

    # --- invariants ---------------------------------------------------------------------------------------

    @invariant()
    def current_is_an_approved_finished_model(self) -> None:
        if not self.root:
            return
        records = {r.seq: r for r in ledger.history(self.root, CAMPAIGN)}
        now = ledger.current(self.root, CAMPAIGN)
        if now is None:
            assert not records
            return
        assert trained.finished_run(now.model) is not None, now.model
        target = now
        while target.action == "rollback":
            assert target.to_seq is not None
            target = records[target.to_seq]
        assert target.seq in self.approved, f"record {target.seq} neither passed the rule nor was a person's"

    @invariant()
    def records_form_one_chain(self) -> None:
        if not self.root:
            return
        records = ledger.history(self.root, CAMPAIGN)
        assert [r.seq for r in records] == list(range(1, len(records) + 1))
        for before, after in zip([None, *records], records, strict=False):
            assert after.parent_seq == (before.seq if before else None)
            assert after.parent == (before.model if before else None)

    @invariant()
    def each_promotion_was_compared_with_its_parent(self) -> None:
        if not self.root:
            return
        for r in ledger.history(self.root, CAMPAIGN):
            if r.seq in self.compared:
                assert r.parent_seq == self.compared[r.seq]

    @invariant()
    def no_campaign_is_stuck(self) -> None:
        if not self.root:
            return
        plan = self._plan()
        rows = {int(r["round"]): r for r in planning.campaign_rows(self.root, CAMPAIGN)}
        assert plan.round not in rows, "the next plan re-runs a decided round"
        streak = 0
        for k in sorted(rows, reverse=True):
            if rows[k]["status"] != planning.FAILED:
                break
            streak += 1
        assert (plan.paused is not None) == (plan.consecutive_failures >= MAX_FAILURES)
        assert plan.consecutive_failures <= streak


def _run(base: str, examples: int, steps: int) -> None:
    FIGURES.update(sequences=0, steps=0)
    started = time.monotonic()
    machine = type("Machine", (CampaignMachine,), {"base": base})
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=examples,
            stateful_step_count=steps,
            derandomize=True,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
    # The figures of the run (pytest -s shows them); nothing is asserted on time.
    print(
        f"\ncampaign state machine on {'s3' if base.startswith('s3://') else 'a local folder'}: "
        f"{FIGURES['sequences']} sequences, "
        f"{FIGURES['steps']} steps, {time.monotonic() - started:.1f} s"
    )
    assert FIGURES["sequences"] >= examples // 2 and FIGURES["steps"] > FIGURES["sequences"]


def test_campaign_state_on_a_local_folder() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        _run(tmp, examples=30, steps=12)


@pytest.mark.tier1
def test_campaign_state_on_s3(s3_env: str) -> None:
    _run(f"{s3_env}/artifacts", examples=10, steps=10)


def test_a_round_with_an_outcome_is_never_read_back_as_undecided(tmp_path) -> None:
    # A sanity check of the helper the machine relies on: an outcome is read back as written.
    cfg, round_dir, _ = _round(str(tmp_path), 1, 0, 0)
    outcomes.record_failure(cfg, round_dir, "s", "E", "m", campaign_round=True)  # type: ignore[arg-type]
    assert (read_round_record(round_dir) or {})["status"] == "failed"
