"""Reproducible rounds: the same resolved config and seed on the same engine writes byte-identical shards
(the same sha256) in a fresh root. The fake and the transformers engine promise it (transformers on the
same torch build and thread count: every batch is seeded from the run seed and its first request id);
vLLM and the openai engine do not (GPU kernels and server-side batching change the last bits).

    .venv/bin/python -m pytest -q tests/reliability/test_reproducible.py
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from sao_core.stages.synth import run_synth
from sao_core.store.layout import hash_config, load_config

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")
STAGES = ("personas", "prompts", "responses", "judgements", "pairs")


def shard_hashes(round_dir: str) -> dict[str, str]:
    """sha256 of every shard and dropped-rows file of a round (manifests hold timings: left out)."""
    root = Path(round_dir)
    files = [
        p
        for stage in STAGES
        for p in (root / stage).rglob("*.jsonl")
        if p.name.startswith(("part-", "dropped-"))
    ]
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(files)}


def rounds_in_fresh_roots(tmp_path: Path, *overrides: str) -> tuple[dict[str, str], dict[str, str], str]:
    first, second = (
        run_synth(load_config(TINY, [f"run.root={tmp_path / name}", *overrides])) for name in ("a", "b")
    )
    assert first.round_url != second.round_url and Path(first.round_url).name == Path(second.round_url).name
    return shard_hashes(first.round_url), shard_hashes(second.round_url), first.round_url


def test_the_fake_engine_writes_the_same_bytes_in_a_fresh_root(tmp_path: Path) -> None:
    overrides = ("engine.name=fake", "engine.fake.malformed_judge_rate=0.2", "engine.fake.truncate_rate=0.1")
    a, b, _ = rounds_in_fresh_roots(tmp_path, *overrides)
    assert a == b
    for stage in STAGES:  # every stage wrote something to compare
        assert any(name.startswith(f"{stage}/part-") for name in a), stage
    assert any("_dropped/" in name for name in a)
    # The comparison can fail: another seed writes other bytes.
    other = run_synth(load_config(TINY, [f"run.root={tmp_path / 'c'}", *overrides, "run.seed=1"]))
    assert hash_config(load_config(TINY, list(overrides))) not in other.round_url
    assert shard_hashes(other.round_url) != a


@pytest.mark.tier1
def test_the_transformers_engine_writes_the_same_bytes_in_a_fresh_root(tmp_path: Path) -> None:
    """The tiny random Llama writes noise and hits max_tokens, so its prompts are dropped as truncated:
    what is compared is the personas and the raw generations kept with their drop reason."""
    a, b, round_dir = rounds_in_fresh_roots(tmp_path, "engine.name=transformers", "prompts.max_tokens=16")
    assert a == b
    dropped = Path(round_dir) / "prompts" / "_candidates" / "_dropped" / "dropped-00000.jsonl"
    assert "prompts/_candidates/_dropped/dropped-00000.jsonl" in a and '"raw_output"' in dropped.read_text()
