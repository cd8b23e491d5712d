"""Model references: local folders that are not models, hub ids and their revisions, models and adapters
at URLs copied once into the cache (memory:// here, a real S3 endpoint in the tier-1 tests)."""

from __future__ import annotations

import os
from pathlib import Path

import fsspec
import pytest

from sao_core.errors import ModelNotFoundError
from sao_core.store import storage
from sao_core.store.models import FETCHED, model_revision, pretrained_kwargs, resolve_adapter, resolve_model
from sao_core.testing import build_tiny_llama

MODEL_FILES = {
    "config.json": b'{"model_type": "llama"}',
    "model.safetensors": b"weights",
    "tokenizer.json": b"{}",
}
ADAPTER_FILES = {"adapter_config.json": b'{"r": 4}', "adapter_model.safetensors": b"lora"}


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SAO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models" / FETCHED


def write_folder(url: str, files: dict[str, bytes]) -> str:
    for name, data in files.items():
        storage.write_bytes(storage.join(url, name), data)
    return url


def fetched(cache: Path) -> list[str]:
    """The cached folders (not the lock files or unfinished downloads, whose names start with a dot)."""
    return sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) if cache.is_dir() else []


@pytest.fixture
def count_downloads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The files every filesystem's get_file copies to this machine, in order."""
    calls: list[str] = []
    real = fsspec.AbstractFileSystem.get_file

    def get_file(self, rpath, lpath, *args, **kwargs):
        calls.append(rpath)
        return real(self, rpath, lpath, *args, **kwargs)

    monkeypatch.setattr(fsspec.AbstractFileSystem, "get_file", get_file)
    return calls


# --- local folders and hub ids --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({}, r"exists but is not a Hugging Face model: no config\.json and no weights"),
        ({"config.json": "{}"}, r"exists but is not a Hugging Face model: no weights \(\*\.safetensors"),
        (
            {"model.safetensors": "x", "tokenizer.json": "{}"},
            r"exists but is not a Hugging Face model: no config\.json$",
        ),
        # A trainer's checkpoint folder holds training_args.bin: that is not a model's weights.
        ({"config.json": "{}", "training_args.bin": "x"}, "no weights"),
    ],
)
def test_a_folder_that_is_not_a_model_says_what_it_lacks(tmp_path, files, message):
    folder = tmp_path / "model"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    with pytest.raises(ModelNotFoundError, match=message):
        resolve_model(str(folder))


def test_missing_paths_and_files_are_named(tmp_path):
    with pytest.raises(ModelNotFoundError, match=f"model path '{tmp_path / 'nothing'}' does not exist"):
        resolve_model(str(tmp_path / "nothing"))
    (tmp_path / "weights.bin").write_text("x")
    with pytest.raises(ModelNotFoundError, match="is a file; give the model folder"):
        resolve_model(str(tmp_path / "weights.bin"))
    assert resolve_model("org/name") == "org/name"  # a hub id is left to from_pretrained


def test_revision_applies_to_hub_ids_only(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    for name, data in MODEL_FILES.items():
        (folder / name).write_bytes(data)
    local = resolve_model(str(folder))
    assert pretrained_kwargs("org/name", "abc123") == {"revision": "abc123"}
    assert pretrained_kwargs("org/name", None) == {}
    assert pretrained_kwargs(local, "abc123") == {}  # a local folder has no revisions
    assert model_revision("org/name", "org/name", "abc123") == "abc123"
    assert model_revision("org/name", "org/name") == "main"
    # The manifest names what was loaded: a folder's own files, whatever revision the config gives.
    assert model_revision(local, local, "abc123") == model_revision(local, local)
    assert model_revision(local, local).startswith("sha256:")


def test_a_folder_retrained_in_place_gets_a_new_revision(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    for name, data in MODEL_FILES.items():
        (folder / name).write_bytes(data)
    weights = next(f for f in folder.iterdir() if f.suffix == ".safetensors")
    first = model_revision(str(folder), str(folder))
    assert model_revision(str(folder), str(folder)) == first  # kept, not read again
    assert [p.read_text() for p in (tmp_path / "cache" / "revisions").iterdir()] == [first]

    # Another round's weights: same name, same size, other bytes.
    data = weights.read_bytes()
    weights.write_bytes(bytes(b ^ 0xFF for b in data))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1_000_000))
    second = model_revision(str(folder), str(folder))
    assert second.startswith("sha256:") and second != first
    # Files the revision does not cover (a README) change nothing.
    (folder / "README.md").write_text("notes")
    assert model_revision(str(folder), str(folder)) == second


# --- folders at URLs --------------------------------------------------------------------------------------


def test_a_model_at_a_url_is_downloaded_once_and_again_when_it_changes(cache, count_downloads):
    url = write_folder("memory://models-once/round_001/full", MODEL_FILES)
    local = resolve_model(url)
    assert Path(local).parent == cache and fetched(cache) == [Path(local).name]
    assert {p.name: p.read_bytes() for p in Path(local).iterdir()} == MODEL_FILES
    assert len(count_downloads) == 3
    assert resolve_model(url + "/") == local and len(count_downloads) == 3  # cached: nothing downloaded
    # The same contents elsewhere are the same cached model: the key is the content, not the URL.
    assert resolve_model(write_folder("memory://models-once/copy", MODEL_FILES)) == local
    assert len(count_downloads) == 3
    # Retrained in place: another key, downloaded again; the earlier copy stays as it was.
    storage.write_bytes(f"{url}/model.safetensors", b"new weights")
    again = resolve_model(url)
    assert again != local and (Path(again) / "model.safetensors").read_bytes() == b"new weights"
    assert len(count_downloads) == 6 and (Path(local) / "model.safetensors").read_bytes() == b"weights"


def test_a_download_killed_halfway_leaves_nothing_that_counts_as_cached(cache, monkeypatch):
    url = write_folder("memory://models-killed/full", MODEL_FILES)
    real = fsspec.AbstractFileSystem.get_file
    calls = []

    def dies_on_the_second_file(self, rpath, lpath, *args, **kwargs):
        calls.append(rpath)
        if len(calls) == 2:
            raise ConnectionError("connection reset")
        return real(self, rpath, lpath, *args, **kwargs)

    monkeypatch.setattr(fsspec.AbstractFileSystem, "get_file", dies_on_the_second_file)
    with pytest.raises(ConnectionError):
        resolve_model(url)
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []
    local = resolve_model(url)  # the next try downloads the whole folder
    assert sorted(p.name for p in Path(local).iterdir()) == sorted(MODEL_FILES)


def test_a_url_that_is_not_a_model_or_not_there_is_named(cache):
    url = write_folder("memory://models-bad/adapter", ADAPTER_FILES)
    with pytest.raises(
        ModelNotFoundError,
        match=r"model folder memory://models-bad/adapter exists but is not a Hugging Face model: "
        r"no config\.json and no weights .* \(it holds a LoRA adapter: give it as model.adapter",
    ):
        resolve_model(url)
    with pytest.raises(ModelNotFoundError, match="model path 'memory://models-bad/none' does not exist"):
        resolve_model("memory://models-bad/none")
    with pytest.raises(ModelNotFoundError, match="is a file; give the model folder"):
        resolve_model(f"{url}/adapter_config.json")
    assert fetched(cache) == []


def test_file_urls_are_local_folders_and_are_not_copied(tmp_path, cache):
    folder = tmp_path / "model"
    folder.mkdir()
    for name, data in MODEL_FILES.items():
        (folder / name).write_bytes(data)
    assert resolve_model(f"file://{folder}") == str(folder)
    assert fetched(cache) == []


def test_adapters_resolve_like_models(tmp_path, cache, count_downloads):
    url = write_folder("memory://adapters/round_001/adapter", ADAPTER_FILES)
    local = resolve_adapter(url)
    assert (Path(local) / "adapter_model.safetensors").read_bytes() == b"lora"
    assert resolve_adapter(url) == local and len(count_downloads) == 2
    storage.remove(f"{url}/adapter_model.safetensors")
    with pytest.raises(
        ModelNotFoundError, match=r"adapter folder .* exists but is not a LoRA adapter: no adapter weights"
    ):
        resolve_adapter(url)
    with pytest.raises(ModelNotFoundError, match=r"adapter path '.*nothing' does not exist"):
        resolve_adapter(str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match=r"no adapter_config\.json and no adapter weights"):
        resolve_adapter(str(tmp_path / "empty"))


# --- a real S3 endpoint -----------------------------------------------------------------------------------


@pytest.fixture
def count_s3_downloads(s3_env: str, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The files s3fs downloads, in order."""
    import s3fs

    calls: list[str] = []
    real = s3fs.S3FileSystem._get_file

    async def _get_file(self, rpath, lpath, **kwargs):
        calls.append(rpath)
        return await real(self, rpath, lpath, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_get_file", _get_file)
    s3fs.S3FileSystem.clear_instance_cache()  # instances bind their sync get_file when built
    return calls


@pytest.mark.tier1
def test_the_tiny_llama_loads_from_s3_and_is_downloaded_once(tmp_path, cache, s3_env, count_s3_downloads):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    count_downloads = count_s3_downloads

    source = Path(build_tiny_llama(tmp_path / "tiny"))
    url = f"{s3_env}/round_001/model/abc/full"
    for f in source.iterdir():
        storage.write_bytes(f"{url}/{f.name}", f.read_bytes())

    local = resolve_model(url)
    assert Path(local).parent == cache
    assert len(count_downloads) == len(list(source.iterdir()))
    model = AutoModelForCausalLM.from_pretrained(local)
    tokenizer = AutoTokenizer.from_pretrained(local)
    reference = AutoModelForCausalLM.from_pretrained(source)
    assert all((a == b).all() for a, b in zip(model.parameters(), reference.parameters(), strict=True))
    assert tokenizer.chat_template and tokenizer("hello").input_ids
    assert model_revision(url, local) == model_revision(str(source), str(source))

    stamp = Path(local).stat().st_mtime_ns
    assert resolve_model(url) == local  # a new process would list the bucket, find the key, download nothing
    assert len(count_downloads) == len(list(source.iterdir())) and Path(local).stat().st_mtime_ns == stamp

    storage.write_bytes(f"{s3_env}/checkpoint/trainer_state.json", b"{}")
    storage.write_bytes(f"{s3_env}/checkpoint/training_args.bin", b"x")
    with pytest.raises(
        ModelNotFoundError,
        match=rf"model folder {s3_env}/checkpoint exists but is not a Hugging Face model: "
        r"no config\.json and no weights",
    ):
        resolve_model(f"{s3_env}/checkpoint")
