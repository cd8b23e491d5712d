"""What a finished round must hold, row id by row id, and whether finished work was written again.

    kept = check_round_by_ids(round_dir)          # every shard once, every input row answered once
    before = snapshot(round_dir, "*/_shards/*.json")
    ...                                          # a kill, a restart, a re-run
    assert changed_since(before) == []            # same bytes, same write time

Shared by the fault tests (tests/reliability) and the cluster tests (tests/cluster), on a local folder
or a bucket.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

from sao_core.store import shards, storage
from sao_core.store.layout import MODEL_STAGES, input_stage, num_shards, output_url, stage_url

ID_KEY = {"prompts": "persona_id", "responses": "prompt_id", "judgements": "prompt_id"}


def check_round_by_ids(round_dir: str) -> dict[str, int]:
    """Every model stage: one complete shard per input shard and no other shard file, every input row
    answered once (kept or dropped), no id kept twice, the stage manifest's totals the sums of its
    shards; the pairs' prompt ids all judged, each once. Returns the rows kept per stage and the pairs."""
    kept_rows: dict[str, int] = {}
    for stage in MODEL_STAGES:
        count = num_shards(round_dir, stage)
        in_url, out_url = stage_url(round_dir, input_stage(stage)), output_url(round_dir, stage)
        names = sorted(
            u.rsplit("/", 1)[-1] for u in storage.list_files(storage.join(out_url, "_shards"), "*.json")
        )
        assert names == [f"part-{i:05d}.json" for i in range(count)], (stage, names)
        data_files = storage.list_files(out_url, "part-*")
        assert len(data_files) == count, (stage, data_files)
        key = ID_KEY[stage]
        inputs: list[str] = []
        kept: list[str] = []
        answered: list[str] = []
        for index in range(count):
            in_rows, _ = shards.read_shard(in_url, index, "jsonl")
            rows, entry = shards.read_shard(out_url, index, "jsonl")
            assert entry.rows_in == len(in_rows), (stage, index)
            dropped = []
            if entry.dropped_file:
                data = storage.read_bytes(storage.join(out_url, entry.dropped_file))
                dropped = shards.decode_rows(data, "jsonl", entry.dropped_file)
            assert sum(entry.drops.values()) == len(dropped), (stage, index)
            inputs += [r[key] for r in in_rows]
            kept += [r[key] for r in rows]
            answered += [r[key] for r in rows] + [r[key] for r in dropped if key in r]
        assert not [i for i, n in Counter(kept).items() if n > 1], f"{stage}: an id written twice"
        assert sorted(answered) == sorted(inputs), f"{stage}: rows lost or invented"
        manifest = shards.read_stage_manifest(stage_url(round_dir, stage))
        assert manifest["num_shards"] == count
        if stage != "prompts":  # prompts' stage manifest counts after the round-wide duplicate pass
            assert (manifest["rows_in"], manifest["rows_out"]) == (len(inputs), len(kept)), stage
        kept_rows[stage] = len(kept)
    pairs = shards.read_stage_rows(stage_url(round_dir, "pairs"), "jsonl")
    judged = {r["prompt_id"] for r in shards.read_stage_rows(stage_url(round_dir, "judgements"), "jsonl")}
    assert len({p["prompt_id"] for p in pairs}) == len(pairs) and {p["prompt_id"] for p in pairs} <= judged
    kept_rows["pairs"] = len(pairs)
    return kept_rows


def shard_lines(text: str) -> list[tuple[str, int]]:
    """(stage, shard) of every shard a process generated and wrote (the runner's INFO line)."""
    return [
        (m[1], int(m[2]))
        for m in re.finditer(r"sao_core\.stages\.runner[: -]+(\w+) shard (\d+): \d+ in", text)
    ]


def snapshot(folder: str, *patterns: str) -> dict[str, tuple[bytes, int]]:
    """Bytes and write time (ns) of every file under a local folder matching one of the globs."""
    return {
        p: (Path(p).read_bytes(), os.stat(p).st_mtime_ns)
        for pattern in patterns
        for p in storage.list_files(folder, pattern)
    }


def changed_since(before: dict[str, tuple[bytes, int]]) -> list[str]:
    """The files of a snapshot whose bytes or write time are no longer what they were."""
    return sorted(p for p, v in before.items() if (Path(p).read_bytes(), os.stat(p).st_mtime_ns) != v)
