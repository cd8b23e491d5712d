"""Self-judgement (SAO.md step 4): the model ranks its own two answers with the paper's template.

build_judge_requests -> engine -> parse_verdict per completion -> chosen and rejected per prompt. An unparseable
verdict is never a crash and never silently dropped: the judgement row is kept as invalid with its raw
text and counted. With `judging.swap` every pair is judged in both orders and only order-consistent
verdicts count (our addition; the paper judges once).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import combinations
from typing import Any

from sao_core.chat import ChatRequest, Completion

# Verbatim from the SAO paper, Figure 1 "Pair-wise Response Ranking" (SAO.md step 4). Do not edit.
JUDGE_TEMPLATE = """You are an impartial judge. Your task is to rank two answers to a given prompt based on their quality.

Prompt: {prompt}

Response 1: <Response 1> {response_1} </Response 1>

Response 2: <Response 2> {response_2} </Response 2>

Please carefully read each response and evaluate them based on the following criteria:

1. Relevance and specificity to the prompt
2. Accuracy and correctness of information
3. Completeness and comprehensiveness
4. Clarity and understandability

Then, rank these two responses from best to worst. You must output your ranking strictly in the following format: ranking: X > Y, where X and Y represent one of 1 or 2, without repetition.

Remember, you must output a complete ranking including both options. Now, please provide your ranking:"""

# Strict and case-insensitive (SAO.md); the lookarounds keep "ranking: 1 > 21" from reading as 1 > 2.
VERDICT_RE = re.compile(r"(?<![\w])ranking:\s*([12])\s*>\s*([12])(?!\d)", re.IGNORECASE)
# `ranking: 1` with no `>` after it and no other digit: only read in lenient mode.
BARE_VERDICT_RE = re.compile(
    r"(?<![\w])ranking:\s*([12])(?![\d\s]*>)(?!\s*[,/&]?\s*(?:and\s*)?\d)", re.IGNORECASE
)


@dataclass(frozen=True)
class Verdict:
    """The position (1 or 2) the judge ranked first; None for an invalid verdict, with `error` saying why."""

    preferred_position: int | None
    error: str | None = None


def parse_verdict(text: str | None, lenient: bool = False) -> Verdict:
    """Parse `ranking: X > Y` (X, Y one of 1 or 2 and different) anywhere in the judge's output.

    `lenient` also reads a bare `ranking: X` (nothing ranked after it) as X first: our addition for
    models too small to write the full format, off in the paper recipes.
    """
    if text is None or not text.strip():
        return Verdict(None, "empty")
    matches = VERDICT_RE.findall(text)
    if not matches and lenient:
        bare = BARE_VERDICT_RE.search(text)
        if bare:
            return Verdict(int(bare.group(1)))
    if not matches:
        return Verdict(None, "no_ranking")
    firsts = set()
    for first, second in matches:
        if first == second:
            return Verdict(None, "repeated_option")
        firsts.add(int(first))
    if len(firsts) > 1:
        return Verdict(None, "conflicting_rankings")
    return Verdict(firsts.pop())


def strip_quoted(text: str | None, quoted: Iterable[str]) -> str | None:
    """The judge's output less verbatim copies of request texts (prompt, answers) that hold a ranking.

    The verdict must be the judge's own: an answer that says "ranking: 2 > 1" is not one when a judge
    repeats its input back (small models often do). A text that is a ranking and nothing more is left
    in, since it cannot be told apart from the judge's own verdict.
    """
    if not text:
        return text
    # Longest first: an answer that repeats the prompt goes whole, before the prompt inside it is stripped.
    for source in sorted(quoted, key=len, reverse=True):
        source = source.strip()
        if VERDICT_RE.search(source) or BARE_VERDICT_RE.search(source):
            rest = BARE_VERDICT_RE.sub("", VERDICT_RE.sub("", source))
            if any(ch.isalnum() for ch in rest):
                text = text.replace(source, " … ")  # a mark, so an echo alone is not read as `empty`
    return text


def format_judge_prompt(prompt: str, response_1: str, response_2: str) -> str:
    return JUDGE_TEMPLATE.format(prompt=prompt, response_1=response_1, response_2=response_2)


def comparison_orders(num_responses: int, swap: bool) -> list[tuple[int, int]]:
    """Which (Response 1, Response 2) index pairs to judge: every unordered pair, both ways if swap."""
    orders = []
    for a, b in combinations(range(num_responses), 2):
        orders.append((a, b))
        if swap:
            orders.append((b, a))
    return orders


def build_judge_requests(
    rows: Iterable[dict[str, Any]], swap: bool, prefill: str | None = None
) -> list[ChatRequest]:
    """One request per comparison, in `comparison_orders` order, optionally with an answer prefill."""
    requests = []
    for row in rows:
        responses = row["responses"]
        for a, b in comparison_orders(len(responses), swap):
            text = format_judge_prompt(row["prompt"], responses[a]["text"], responses[b]["text"])
            requests.append(
                ChatRequest.user(f"{row['prompt_id']}:{a}:{b}", text, kind="judge", prefill=prefill or "")
            )
    return requests


def _chosen_and_rejected(
    responses: list[dict[str, Any]], comparisons: list[dict[str, Any]]
) -> tuple[int, int] | str:
    """(chosen index, rejected index), or the reason no pair can be chosen.

    Per unordered pair, the verdicts of all its orders must agree. With k > 2 answers the chosen one
    has the most wins and the rejected one the fewest; a tie between two is broken by their own
    comparison, any other tie leaves the prompt without a pair.
    """
    by_pair: dict[tuple[int, int], list[int | None]] = {}
    for c in comparisons:
        a, b = c["response_1"], c["response_2"]
        position = c["preferred_position"]
        winner = None if position is None else (a if position == 1 else b)
        by_pair.setdefault((min(a, b), max(a, b)), []).append(winner)
    outcome: dict[tuple[int, int], int] = {}
    errors = []
    for pair, winners in by_pair.items():
        if any(w is None for w in winners):
            errors.append("invalid_verdict")
        elif len(set(winners)) > 1:
            errors.append("inconsistent_order")
        else:
            outcome[pair] = winners[0]  # type: ignore[assignment]
    if len(responses) == 2 or not outcome:
        if errors:
            return errors[0]
        (pair, winner), *_ = outcome.items()
        return winner, pair[0] if winner == pair[1] else pair[1]
    wins = Counter({i: 0 for i in range(len(responses))})
    for winner in outcome.values():
        wins[winner] += 1
    ranked = sorted(wins, key=lambda i: -wins[i])
    top = [i for i in ranked if wins[i] == wins[ranked[0]]]
    bottom = [i for i in ranked if wins[i] == wins[ranked[-1]]]

    def untie(tied: list[int], best: bool) -> int | None:
        if len(tied) == 1:
            return tied[0]
        if len(tied) == 2 and (min(tied), max(tied)) in outcome:
            w = outcome[(min(tied), max(tied))]
            return w if best else (tied[0] if w == tied[1] else tied[1])
        return None

    chosen, rejected = untie(top, True), untie(bottom, False)
    if chosen is None or rejected is None or chosen == rejected:
        return "tie"
    return chosen, rejected


def parse_judge_completions(
    rows: list[dict[str, Any]], completions: list[list[Completion]], swap: bool, lenient: bool = False
) -> list[dict[str, Any]]:
    """One judgement row per prompt, valid or not, with every raw judge output kept."""
    out_rows = []
    it = iter(completions)
    for row in rows:
        responses = row["responses"]
        comparisons = []
        for a, b in comparison_orders(len(responses), swap):
            out = next(it)[0]
            # The raw text is kept as the judge wrote it; the verdict is read from its own words only.
            own = strip_quoted(out.text, (row["prompt"], responses[a]["text"], responses[b]["text"]))
            verdict = parse_verdict(own, lenient)
            comparisons.append(
                {
                    "response_1": a,
                    "response_2": b,
                    "response_1_id": responses[a]["response_id"],
                    "response_2_id": responses[b]["response_id"],
                    "raw_judge_output": out.text,
                    "finish_reason": out.finish_reason,
                    "preferred_position": verdict.preferred_position,
                    "error": verdict.error,
                }
            )
        decision = _chosen_and_rejected(responses, comparisons)
        judgement: dict[str, Any] = {
            "prompt_id": row["prompt_id"],
            "persona_id": row["persona_id"],
            "round": row["round"],
            "comparisons": comparisons,
            "raw_judge_output": "\n---\n".join(c["raw_judge_output"] for c in comparisons),
        }
        if isinstance(decision, str):
            judgement.update(
                valid=False, invalid_reason=decision, chosen_response_id=None, rejected_response_id=None
            )
        else:
            chosen, rejected = decision
            judgement.update(
                valid=True,
                invalid_reason=None,
                chosen_response_id=responses[chosen]["response_id"],
                rejected_response_id=responses[rejected]["response_id"],
            )
        out_rows.append(judgement)
    leftover = next(it, None)
    if leftover is not None:
        raise ValueError("more judge completions than comparisons: requests and rows are out of step")
    return out_rows


def count_judgements(rows: list[dict[str, Any]], responses: list[dict[str, Any]]) -> dict[str, int]:
    """Additive counts for one shard; `judge_diagnostics` turns summed counts into rates."""
    lengths = {r["response_id"]: len(r["text"]) for row in responses for r in row["responses"]}
    c: Counter[str] = Counter()
    for row in rows:
        c["judgements"] += 1
        c["valid_judgements" if row["valid"] else f"invalid:{row['invalid_reason']}"] += 1
        orders: dict[tuple[str, str], int | None] = {}
        for comp in row["comparisons"]:
            c["verdicts"] += 1
            position = comp["preferred_position"]
            if position is None:
                c[f"verdict_error:{comp['error']}"] += 1
                continue
            c["parsed_verdicts"] += 1
            c["first_wins"] += position == 1
            winner_id = comp["response_1_id"] if position == 1 else comp["response_2_id"]
            loser_id = comp["response_2_id"] if position == 1 else comp["response_1_id"]
            if lengths[winner_id] != lengths[loser_id]:
                c["length_decided"] += 1
                c["longer_wins"] += lengths[winner_id] > lengths[loser_id]
            orders[(comp["response_1_id"], comp["response_2_id"])] = (
                1 if winner_id == comp["response_1_id"] else 2
            )
        for (r1, r2), w in orders.items():
            if r1 < r2 and (r2, r1) in orders:
                c["swap_pairs"] += 1
                c["swap_consistent"] += w != orders[(r2, r1)]  # same answer wins: positions flip
    return dict(c)


def judge_diagnostics(counts: dict[str, int]) -> dict[str, Any]:
    """Parse rate, position bias (share of "1 > 2"), length bias, swap consistency, invalid reasons."""

    def rate(num: str, den: str) -> float | None:
        return round(counts.get(num, 0) / counts[den], 4) if counts.get(den) else None

    return {
        "judgements": counts.get("judgements", 0),
        "valid_judgements": counts.get("valid_judgements", 0),
        "valid_rate": rate("valid_judgements", "judgements"),
        "verdicts": counts.get("verdicts", 0),
        "parse_rate": rate("parsed_verdicts", "verdicts"),
        "first_wins_rate": rate("first_wins", "parsed_verdicts"),
        "longer_wins_rate": rate("longer_wins", "length_decided"),
        "swap_consistency": rate("swap_consistent", "swap_pairs"),
        "invalid_by_reason": {
            k.split(":", 1)[1]: v for k, v in sorted(counts.items()) if k.startswith("invalid:")
        },
        "verdict_errors": {
            k.split(":", 1)[1]: v for k, v in sorted(counts.items()) if k.startswith("verdict_error:")
        },
    }
