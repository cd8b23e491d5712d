"""The output folder: what run it holds, its checkpoints (staged locally, mirrored to a remote output),
and the files a finished run writes (see the package docstring for the layout)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from sao_core.config import RoundConfig, TrainingConfig
from sao_core.errors import TrainingError
from sao_core.store import storage
from sao_core.training.plots import plot_curves

# Settings that change how a run is launched or kept, not what it learns: a resumed run may change them,
# and only what changes the output may name its folder. The batch split is launch-only too: the global
# batch is fixed (training.global_batch_size) and accumulation makes up the rest, and activation
# checkpointing trades memory for time. Kept in the hash: `deepspeed` (a ZeRO checkpoint and a DDP one
# do not stand in for each other) and `merge` (a run found finished would not write the merged model).
_LAUNCH_KEYS = (
    "launcher",
    "deployment",
    "num_processes",
    "per_device_batch_size",
    "gradient_checkpointing",
    "accelerate_config",
    "checkpoint_steps",
    "save_total_limit",
    "keep_checkpoints",
    "logging_steps",
    # where the logged steps are also reported (tensorboard, mlflow, wandb): the same run learns the same
    # thing, so a run of today's default (none) keeps the hash it had before the key existed
    "report_to",
)
# Keys that run.json and manifest.json once recorded under another name: a run begun before the
# rename still resumes, and a finished one is still found.
_OLD_IDENTITY_KEYS = {"training_hash": "params_hash"}


# --- run identity -------------------------------------------------------------------------------------


def training_hash(cfg: RoundConfig) -> str:
    """What the run learns: the training settings (less how it is launched) and the starting model."""
    training = cfg.training.model_dump(mode="json")
    for key in _LAUNCH_KEYS:
        training.pop(key, None)
    canonical = json.dumps({"training": training, "model": cfg.model.model_dump(mode="json")}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def run_identity(cfg: RoundConfig, pairs_sha256: str) -> dict[str, str]:
    """What a run.json and a finished manifest record: a rerun into the same folder must match it."""
    return {"training_hash": training_hash(cfg), "pairs_sha256": pairs_sha256, "model": cfg.model.path}


def _recorded_identity(recorded: dict[str, Any], identity: dict[str, str]) -> dict[str, Any]:
    """The identity a run.json or manifest recorded, read under today's keys."""
    return {k: recorded.get(k, recorded.get(_OLD_IDENTITY_KEYS.get(k, k))) for k in identity}


def finished_manifest(output_url: str, identity: dict[str, str]) -> dict[str, Any] | None:
    """The manifest of a finished run with the same identity; an error for a different one."""
    url = storage.join(output_url, "manifest.json")
    if not storage.exists(url):
        return None
    manifest = storage.read_json(url)
    if not isinstance(manifest, dict) or not manifest.get("complete"):
        return None
    theirs = _recorded_identity(manifest, identity)
    if theirs != identity:
        raise TrainingError(
            f"{output_url} already holds a model trained from other settings or pairs ({theirs} != {identity}); "
            "give another output URL or remove it"
        )
    return manifest


def check_run_identity(output_url: str, identity: dict[str, str], write: bool) -> None:
    """Refuse to resume checkpoints made from other settings or pairs; record ours for later runs."""
    url = storage.join(output_url, "run.json")
    if storage.exists(url):
        theirs = storage.read_json(url)
        if _recorded_identity(theirs, identity) != identity:
            raise TrainingError(
                f"{output_url} holds checkpoints of another run ({url}: {theirs} != {identity}); "
                "give another output URL or remove that folder"
            )
    elif write:
        storage.write_json(url, identity)


# --- checkpoints and staging --------------------------------------------------------------------------

ROWS_SEEN = "rows_seen.json"  # in each checkpoint: the pair rows every rank trained on up to its step
CLAIM = "_claims/train.json"  # the lease of the process training into the folder (sao_core.store.locks)


def train_claim_url(output_url: str) -> str:
    """Where the process training into `output_url` holds its lease: one trainer per output folder."""
    return storage.join(output_url, CLAIM)


def write_rows_seen(checkpoint: Path, step: int, ranks: list[list[int]]) -> None:
    """Record the rows (indices into the pairs) each rank trained on in steps 1..step, atomically."""
    tmp = checkpoint / f"{ROWS_SEEN}.tmp"
    tmp.write_text(json.dumps({"step": step, "ranks": ranks}))
    tmp.replace(checkpoint / ROWS_SEEN)


def rows_seen_at(checkpoint: Path, rank: int, world_size: int) -> list[int] | None:
    """The rows this rank had trained on at a checkpoint; None when the checkpoint does not say (made
    before this was recorded, or killed between its trainer_state.json and this file). Under another
    number of processes than the checkpoint's, rank 0 takes every earlier row: the totals stay right."""
    try:
        data = json.loads((checkpoint / ROWS_SEEN).read_text())
        step, ranks = int(data["step"]), [[int(r) for r in rows] for rows in data["ranks"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if str(step) != checkpoint.name[11:]:
        return None
    if len(ranks) == world_size:
        return ranks[rank]
    return [r for rows in ranks for r in rows] if rank == 0 else []


def last_checkpoint(folder: str | Path) -> Path | None:
    """The newest complete checkpoint-N under a local folder (its trainer_state.json reads and says step N)."""
    root = Path(folder)
    if not root.is_dir():
        return None
    found = []
    for child in root.iterdir():
        if child.is_dir() and child.name.startswith("checkpoint-") and child.name[11:].isdigit():
            found.append((int(child.name[11:]), child))
    for step, child in sorted(found, reverse=True):
        try:
            state = json.loads((child / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue  # killed while saving
        if state.get("global_step") == step:
            return child
    return None


def walk(url: str) -> list[str]:
    """Every file URL under a folder URL, sorted; none when it does not exist."""
    fs, path = storage.url_to_fs(url)
    if not fs.exists(path):
        return []
    prefix = url.rstrip("/")
    base = path.rstrip("/")
    return sorted(prefix + p[len(base) :] for p in fs.find(path) if p.startswith(base))


def upload_folder(local: Path, url: str) -> None:
    files = sorted(p for p in local.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name == "trainer_state.json")  # the completion mark goes last
    for p in files:
        storage.write_bytes(storage.join(url, p.relative_to(local).as_posix()), p.read_bytes())


def prune_remote_checkpoints(output_url: str, local_checkpoints: Path) -> None:
    keep = {p.name for p in local_checkpoints.iterdir()} if local_checkpoints.is_dir() else set()
    for url in storage.list_files(storage.join(output_url, "checkpoints"), "checkpoint-*"):
        if url.rstrip("/").rsplit("/", 1)[-1] not in keep:
            storage.remove(url, recursive=True)


def download_last_checkpoint(output_url: str, staging: Path) -> None:
    """Bring the newest complete remote checkpoint into the staging folder, if it is not there yet."""
    remote = storage.join(output_url, "checkpoints")
    steps = []
    for url in storage.list_files(remote, "checkpoint-*"):
        name = url.rstrip("/").rsplit("/", 1)[-1]
        if name[11:].isdigit() and storage.exists(storage.join(url, "trainer_state.json")):
            steps.append((int(name[11:]), url, name))
    if not steps:
        return
    step, url, name = max(steps)
    have = last_checkpoint(staging / "checkpoints")
    if have is not None and int(have.name[11:]) >= step:
        return
    target = staging / "checkpoints" / name
    shutil.rmtree(target, ignore_errors=True)
    for file_url in walk(url):
        dest = target / file_url[len(url.rstrip("/")) + 1 :]
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(storage.read_bytes(file_url))


def staging_dir(output_url: str) -> Path:
    """Where the run trains: the output itself when local, else a folder under the cache keyed by URL."""
    if storage.is_local(output_url):
        return Path(storage.url_to_fs(output_url)[1])
    from sao_core.store.models import cache_dir

    key = hashlib.sha256(output_url.rstrip("/").encode()).hexdigest()[:16]
    return cache_dir() / "train-staging" / key


# --- what a finished run records -----------------------------------------------------------------------


def trainable_sha256(model: Any) -> str:
    h = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if param.requires_grad:
            h.update(name.encode())
            h.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def device_name(use_cpu: bool) -> str:
    import torch

    return "cpu" if use_cpu else str(torch.cuda.get_device_name(0))


def backend() -> str | None:
    import torch.distributed as dist

    return str(dist.get_backend()) if dist.is_available() and dist.is_initialized() else None


def versions() -> dict[str, str]:
    import importlib.metadata as md

    return {p: md.version(p) for p in ("torch", "transformers", "trl", "peft", "accelerate", "datasets")}


def write_outputs(
    output_url: str,
    staging: Path,
    remote: bool,
    manifest: dict[str, Any],
    steps: list[dict[str, Any]],
    ranks: list[dict[str, Any]],
    tcfg: TrainingConfig,
) -> None:
    if remote:
        for name in ("adapter", "full", "logs"):  # logs: training.report_to's event files
            if (staging / name).is_dir():
                upload_folder(staging / name, storage.join(output_url, name))
    storage.write_json(
        storage.join(output_url, "train_log.json"),
        {"objective": tcfg.objective, "config_hash": manifest["config_hash"], "steps": steps},
    )
    title = f"{tcfg.objective} ({'LoRA' if tcfg.lora.enabled else 'full'}), {manifest['rows']} pairs"
    storage.write_bytes(storage.join(output_url, "train_curves.png"), plot_curves(steps, title))
    storage.write_json(storage.join(output_url, "ranks.json"), ranks)
    storage.write_json(storage.join(output_url, "manifest.json"), manifest)  # last: marks the run finished
