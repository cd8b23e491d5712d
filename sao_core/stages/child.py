"""One shard of a model stage in a child process: how the vllm engine runs a stage shard.

    run_shard_in_child("responses", cfg, round_dir, 3)   # python -m sao_core.stages.responses ... under engine.python

The child is the shard command of sao_core.stages.cli; it writes the shard and its manifest itself, and
the parent checks the manifest against the input and settings it computed. A crash or an OOM kill of the
child fails that shard only, with the child's last log lines.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any

from sao_core import storage
from sao_core.config import RoundConfig, config_to_dict
from sao_core.engines.child import ChildProcess, interpreter
from sao_core.errors import StorageError
from sao_core.models import resolve_model
from sao_core.stages.layout import shard_target
from sao_core.storage import ShardManifest

log = logging.getLogger(__name__)


def config_overrides(base: Mapping[str, Any], want: Mapping[str, Any], prefix: str = "") -> list[str]:
    """`key=value` overrides that turn config mapping `base` into `want` (values as JSON, which YAML reads)."""
    out = []
    for key, value in want.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), Mapping):
            out.extend(config_overrides(base[key], value, f"{prefix}{key}."))
        elif base.get(key) != value:
            out.append(f"{prefix}{key}={json.dumps(value)}")
    return out


def run_shard_in_child(stage: str, cfg: RoundConfig, round_dir: str, index: int) -> ShardManifest:
    """Run one shard in `python -m sao_core.stages.<stage>` under engine.python; return its verified manifest.

    The child reads the round's resolved_config.yaml (plus overrides for anything the caller's config
    changes), gets the model folder resolved here, and writes the shard and its manifest itself. A shard
    counts as done only if its manifest verifies against the input and settings computed here.
    """
    what = f"{stage} shard {index}"
    if round_dir.startswith("memory://"):
        raise StorageError(
            f"{what}: the vllm engine writes shards from a child process, which cannot see {round_dir}; "
            "use a folder or an object store for run.root"
        )
    config_url = storage.join(round_dir, "resolved_config.yaml")
    if not storage.exists(config_url):
        raise StorageError(f"{what}: {config_url} is missing; the round folder comes from prepare_round(cfg)")
    import yaml

    resolved = yaml.safe_load(storage.read_text(config_url)) or {}
    overrides = config_overrides(resolved, config_to_dict(cfg))
    target = shard_target(stage, cfg, round_dir, index)
    cmd = [
        interpreter(cfg.engine),
        "-m",
        f"sao_core.stages.{stage}",
        "--config",
        config_url,
        "--round",
        round_dir,
        "--shard",
        str(index),
        "--model-dir",
        resolve_model(cfg.model.path),
    ]
    for override in overrides:
        cmd += ["--set", override]
    child = ChildProcess(cmd, what)
    try:
        rc = child.wait()
    finally:
        child.kill_group()
    seconds = time.perf_counter() - child.started
    if rc != 0:
        raise child.failure(rc)
    entry = storage.shard_is_done(target.out_url, index, target.input_sha256, target.settings_hash)
    if entry is None:
        raise child.failure(rc, context="but left no shard that verifies against its manifest")
    log.info("%s: vLLM child finished in %.1fs (%d rows out)", what, seconds, entry.rows_out)
    return entry
