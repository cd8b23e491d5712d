"""Planning a campaign's next round (sao_core/campaign/planning.py, tasks/campaign.plan_round): the model a
round starts from travels with everything that loads it, the pinned hub revision included."""

from __future__ import annotations

import pytest

from sao_core.campaign import ledger, planning
from sao_core.campaign.campaign_report import write_round_record
from sao_core.config import build_config, config_to_yaml
from sao_core.store.layout import load_config
from tasks.campaign import plan_round
from tests.core.test_campaign import CAMPAIGN, make_round


@pytest.mark.parametrize("full", [False, True], ids=["adapter", "full model"])
def test_a_promoted_model_keeps_its_base_revision_in_the_next_rounds_plan(tmp_path, full):
    # The base is a hub id pinned to a revision. Once round 1's adapter was promoted, the plan of round 2
    # said model.revision=null, so round 2 loaded the hub's newest base under an adapter trained on another.
    root = str(tmp_path / "artifacts")
    round_dir, model = make_round(root, 1, full=full, path="org/base", revision="abc123")
    record = ledger.promote(root, CAMPAIGN, round_dir, model, why="round 1 won")
    # An adapter loads on its base at the revision it was trained on; a merged full model is a local
    # folder, where a revision means nothing.
    assert record.model_revision == (None if full else "abc123")
    write_round_record(round_dir, {"round": 1, "promoted": True})

    recipe = tmp_path / "recipe.yaml"
    cfg = build_config(
        {
            "run": {"root": root, "campaign": CAMPAIGN},
            "engine": {"name": "fake"},
            "model": {"path": "org/base", "revision": "abc123"},
        }
    )
    recipe.write_text(config_to_yaml(cfg))
    plan = plan_round.fn(str(recipe), [])
    assert plan["round"] == 2 and plan["start_adapter"] == record.model_adapter
    planned = load_config(str(recipe), plan["overrides"])
    assert (planned.model.path, planned.model.adapter, planned.model.revision) == (
        record.model_path,
        record.model_adapter,
        record.model_revision,
    )
    assert planning.start_point(planned) == (record.model_path, record.model_adapter, record.model_revision)
