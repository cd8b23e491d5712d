"""The quality gate: pairs and the judge's valid rate (not its parse rate) against their thresholds."""

import pytest

from sao_core.config import build_config
from sao_core.engines import Completion
from sao_core.errors import RoundQualityError
from sao_core.method.judging import count_judgements, judge_diagnostics, parse_judge_completions
from sao_core.method.quality import check_quality, judge_valid_rate
from sao_core.stages.synth import run_synth


def cfg_with(*overrides):
    return build_config({}, ["judging.min_valid_rate=0.5", "pairing.min_pairs=1", *overrides])


def _rows(n):
    return [
        {
            "prompt_id": f"p{i}",
            "persona_id": f"pe{i}",
            "prompt": "Q?",
            "round": 1,
            "responses": [{"response_id": f"p{i}-r{k}", "text": "x" * (k + 1)} for k in range(2)],
        }
        for i in range(n)
    ]


def _judgements_summary(verdicts, swap, n):
    """The judgements summary the runner would write for these judge outputs (`diagnostics` only)."""
    rows = _rows(n)
    judged = parse_judge_completions(rows, [[Completion(v, "stop")] for v in verdicts], swap)
    counts = count_judgements(judged, rows)
    return {"rows_out": n, "diagnostics": judge_diagnostics(counts)}, counts


def test_swap_rounds_whose_orders_disagree_fail_the_gate():
    # A position-biased judge: every verdict parses, but "1 > 2" in both orders names two winners.
    summary, _ = _judgements_summary(["ranking: 1 > 2"] * 8, swap=True, n=4)
    assert summary["diagnostics"]["parse_rate"] == 1.0 and summary["diagnostics"]["valid_rate"] == 0.0
    with pytest.raises(RoundQualityError) as e:
        check_quality(cfg_with("judging.swap=true"), {"rows_out": 5}, summary)
    msg = str(e.value)
    assert "judge valid rate 0.0% is under judging.min_valid_rate=50.0%" in msg
    assert "judging.swap: the two orders agreed on 0.0% of pairs" in msg


def test_swap_rounds_whose_orders_mostly_disagree_fail_the_gate():
    # One pair of four agrees (first answer wins in both orders), three are position-biased.
    verdicts = ["ranking: 1 > 2", "ranking: 2 > 1"] + ["ranking: 1 > 2"] * 6
    summary, _ = _judgements_summary(verdicts, swap=True, n=4)
    with pytest.raises(RoundQualityError, match=r"judge valid rate 25\.0% is under judging\.min_valid_rate"):
        check_quality(cfg_with("judging.swap=true"), {"rows_out": 1}, summary)
    # Half agreeing meets a threshold of a half.
    verdicts = ["ranking: 1 > 2", "ranking: 2 > 1"] * 2 + ["ranking: 1 > 2"] * 4
    summary, _ = _judgements_summary(verdicts, swap=True, n=4)
    figures = check_quality(cfg_with("judging.swap=true"), {"rows_out": 2}, summary)
    assert figures["valid_rate"] == 0.5 and figures["parse_rate"] == 1.0


def test_rates_read_from_a_full_manifest_counts_or_a_summary():
    summary, counts = _judgements_summary(["ranking: 1 > 2"] * 4, swap=True, n=2)
    cfg = cfg_with("judging.swap=true")
    assert judge_valid_rate(cfg, summary) == (0.0, "valid rate")
    assert judge_valid_rate(cfg, {"judge_counts": counts}) == (0.0, "valid rate")
    # A parse rate alone is no valid rate where they differ: swap on, or more than two answers.
    assert judge_valid_rate(cfg, {"diagnostics": {"parse_rate": 1.0}}) == (None, None)
    assert judge_valid_rate(cfg_with("responses.k=3"), {"diagnostics": {"parse_rate": 1.0}}) == (None, None)
    # One order of two answers: a verdict that parses is a valid judgement, so the two rates are one.
    assert judge_valid_rate(cfg_with(), {"diagnostics": {"parse_rate": 0.9}}) == (0.9, "parse rate")
    assert judge_valid_rate(cfg_with(), {}) == (None, None)


@pytest.mark.parametrize(
    ("overrides", "pairs", "judgements", "error"),
    [
        ((), 3, {"diagnostics": {"valid_rate": 0.9, "parse_rate": 0.9}}, None),
        ((), 3, {"diagnostics": {"valid_rate": 0.5, "parse_rate": 1.0}}, None),  # at the threshold
        ((), 3, {"diagnostics": {"valid_rate": 0.4, "parse_rate": 1.0}}, r"judge valid rate 40\.0% is under"),
        (
            ("responses.k=3",),  # ties between three answers: every verdict parsed, few pairs
            3,
            {"diagnostics": {"valid_rate": 0.2, "parse_rate": 1.0}},
            r"judge valid rate 20\.0% is under judging\.min_valid_rate=50\.0%$",
        ),
        ((), 3, {"judge_counts": {"judgements": 10, "valid_judgements": 3}}, r"valid rate 30\.0%"),
        (
            (),
            3,
            {"diagnostics": {"parse_rate": 0.1}},
            r"judge parse rate 10\.0% is under judging\.min_valid_rate",
        ),
        ((), 3, {"diagnostics": {"parse_rate": 0.9}}, None),
        (
            ("judging.swap=true",),
            3,
            {"diagnostics": {"parse_rate": 0.9}},
            r"has no valid rate .*min_valid_rate",
        ),
        ((), 3, {"diagnostics": {"valid_rate": None, "judgements": 0}}, r"no verdicts at all"),
        (("judging.min_valid_rate=0",), 3, {}, None),
        (("judging.min_valid_rate=0",), 3, {"diagnostics": {"valid_rate": None}}, None),
        (
            ("pairing.min_pairs=5",),
            3,
            {"diagnostics": {"valid_rate": 0.9}},
            r"3 pairs .*pairing\.min_pairs=5$",
        ),
        (
            ("pairing.min_pairs=5",),
            3,
            {"diagnostics": {"valid_rate": 0.1}},
            r"pairing\.min_pairs=5; judge valid rate 10\.0%",  # every failed threshold is named
        ),
    ],
)
def test_gate_table(overrides, pairs, judgements, error):
    cfg = cfg_with(*overrides)
    if error is None:
        figures = check_quality(cfg, {"rows_out": pairs}, judgements)
        assert figures["pairs"] == pairs and figures["min_valid_rate"] == cfg.judging.min_valid_rate
    else:
        with pytest.raises(RoundQualityError, match=error):
            check_quality(cfg, {"rows_out": pairs}, judgements)


def _biased_round(root, swap):
    return build_config(
        {
            "run": {"root": str(root), "campaign": "c", "shard_size": 5},
            "engine": {"name": "fake", "fake": {"position_bias": 1.0}},
            "personas": {"n": 6},
            "prompts": {"max_tokens": 64},
            "responses": {"max_tokens": 128},
            "judging": {"swap": swap, "min_valid_rate": 0.5},
            "pairing": {"min_pairs": 0},
        }
    )


def test_a_position_biased_round_stops_at_the_gate(tmp_path):
    """A whole round on the scripted engine: a judge that always says "1 > 2" parses, but never agrees."""
    cfg = _biased_round(tmp_path / "swap", swap=True)
    summary = run_synth(cfg).summary
    d = summary["judgements"]["diagnostics"]
    assert d["parse_rate"] == 1.0 and d["valid_rate"] == 0.0 and d["swap_consistency"] == 0.0
    with pytest.raises(RoundQualityError, match=r"judge valid rate 0\.0% is under judging\.min_valid_rate"):
        check_quality(cfg, summary["pairs"], summary["judgements"])
    # Judged in one order, the same judge's verdicts are all valid pairs, and the gate lets them through.
    cfg = _biased_round(tmp_path / "one-order", swap=False)
    summary = run_synth(cfg).summary
    assert check_quality(cfg, summary["pairs"], summary["judgements"])["valid_rate"] == 1.0
