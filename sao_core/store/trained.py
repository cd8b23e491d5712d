"""Finished training runs in the store: found, checked and keyed by their weights.

A run's output folder holds manifest.json (written last, `complete` and `stage: train` once it finished)
and the weights it names (adapter/, full/). `trained_model` is the one check that a folder is a usable
model; `weights_key` is the content key of its weights, as the model cache keys fetched folders.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from sao_core.errors import ModelNotFoundError
from sao_core.store import storage
from sao_core.store.models import content_key
from sao_core.store.storage import normalise_url, parent_url


@dataclass(frozen=True)
class TrainedModel:
    """The output folder of a finished training run, as found in the artifact store."""

    url: str
    manifest: dict[str, Any]
    weights: str  # the folder the next round loads: {url}/full, else {url}/adapter
    round_dir: str | None  # the round whose pairs it was trained on; None when that cannot be told


def is_round(url: str) -> bool:
    marker = storage.join(url, "resolved_config.yaml")
    storage.forget_listing(marker)  # s3fs answers `exists` from listings cached before other writers wrote
    return storage.exists(marker)


# --- trained models ------------------------------------------------------------------------------------


def finished_run(url: str) -> dict[str, Any] | None:
    """The manifest of the finished training run at `url`, or None (no manifest, or not finished)."""
    manifest_url = storage.join(url, "manifest.json")
    storage.forget_listing(manifest_url)  # written by a training process since this one listed the folder
    if not storage.exists(manifest_url):
        return None
    manifest = storage.read_json(manifest_url)
    if isinstance(manifest, dict) and manifest.get("complete") and manifest.get("stage") == "train":
        return manifest
    return None


def _trained_from(url: str, manifest: dict[str, Any]) -> str | None:
    """The round whose pairs the run trained on: where its pair files are, else the folder it sits in."""
    candidates = []
    files = manifest.get("pairs_files") or []
    first = str(files[0]) if files else ""
    if "://" in first or os.path.isabs(first):  # {round}/pairs/part-00000.jsonl
        candidates.append(parent_url(parent_url(first)))
    candidates.append(parent_url(parent_url(url)))  # {round}/model/{training hash}
    for candidate in candidates:
        if is_round(candidate):
            return normalise_url(candidate)
    return None


def trained_model(url: str) -> TrainedModel:
    """The finished training run at `url` (its output folder, or the adapter/ or full/ in it), checked:
    manifest.json says the run finished and the weights it names are there. ModelNotFoundError if not."""
    url = normalise_url(url)
    storage.forget_listing(storage.join(url, "manifest.json"))
    inner = url.rsplit("/", 1)[-1] in ("adapter", "full")  # the weights folder inside a run's output
    if inner and not storage.exists(storage.join(url, "manifest.json")) and finished_run(parent_url(url)):
        url = parent_url(url)
    manifest_url = storage.join(url, "manifest.json")
    if not storage.exists(manifest_url):
        raise ModelNotFoundError(
            f"{url} is not a finished training run: it has no manifest.json (training writes it last)"
        )
    manifest = finished_run(url)
    if manifest is None:
        raise ModelNotFoundError(
            f"{manifest_url} does not say a training run finished (stage train, complete)"
        )
    for key, config_file in (("full_model", "config.json"), ("adapter", "adapter_config.json")):
        if not manifest.get(key):
            continue
        folder = storage.join(url, str(manifest[key]))
        storage.forget_listing(storage.join(folder, config_file))
        weights = storage.list_files(folder, "*.safetensors") + storage.list_files(folder, "*.bin")
        if not storage.exists(storage.join(folder, config_file)) or not weights:
            raise ModelNotFoundError(
                f"{folder} is missing or incomplete (no {config_file} or no *.safetensors / *.bin weights), "
                f"though {manifest_url} names it"
            )
    loads = manifest.get("full_model") or manifest.get("adapter")
    if not loads:
        raise ModelNotFoundError(f"{manifest_url} names no weights (neither adapter nor full_model)")
    return TrainedModel(url, manifest, storage.join(url, str(loads)), _trained_from(url, manifest))


def weights_key(url: str) -> str:
    """Content key of a weights folder: sha256 over its files' paths, sizes and checksums (the store's ETag
    where it lists one, else the bytes' sha256), as the model cache keys fetched folders."""
    fs, root = storage.url_to_fs(url)
    root = root.rstrip("/")
    fs.invalidate_cache(root)
    files = {}
    for path, info in fs.find(root, detail=True).items():
        rel = path[len(root) :].lstrip("/")
        if rel and info.get("type", "file") == "file":
            files[rel] = info
    if not files:
        raise ModelNotFoundError(f"weights folder {url} is empty or missing")
    return str(content_key(fs, files))
