"""A finished training run written by hand (a LoRA adapter, or with full=True a merged model), for the
tests of what reads one: tests/core/test_campaign.py and tests/core/test_lineage.py."""

from __future__ import annotations

from sao_core.config import RoundConfig
from sao_core.store import storage
from sao_core.store.layout import stage_url
from sao_core.training.data import find_pair_files, pairs_sha256
from sao_core.training.launch import default_output_url
from sao_core.training.outputs import training_hash


def fake_training_run(cfg: RoundConfig, round_dir: str, full: bool = False, output: str | None = None) -> str:
    """What sao_core.training writes for a finished run (training/run.py): the weights folder, then
    manifest.json with the run's identity and the round's pair files and their hash. The weights are
    bytes, not a model. Returns the model folder."""
    out = output or default_output_url(cfg)
    pairs = stage_url(round_dir, "pairs")
    name = "full" if full else "adapter"
    config_file = "config.json" if full else "adapter_config.json"
    weights_file = "model.safetensors" if full else "adapter_model.safetensors"
    storage.write_json(storage.join(out, name, config_file), {"round": cfg.run.round})
    storage.write_bytes(storage.join(out, name, weights_file), f"weights of {out}".encode())
    storage.write_json(
        storage.join(out, "manifest.json"),
        {
            "stage": "train",
            "complete": True,
            "training_hash": training_hash(cfg),
            "pairs_sha256": pairs_sha256(pairs),
            "model": cfg.model.path,
            "config_hash": "t" * 12,
            "objective": "simpo",
            "adapter": None if full else "adapter",
            "full_model": "full" if full else None,
            "steps": 2,
            "pairs_files": find_pair_files(pairs),
        },
    )
    return out
