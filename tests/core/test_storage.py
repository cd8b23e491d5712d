import hashlib
import json
import threading

import pytest

from sao_core.errors import ManifestError, StorageConflict, StorageError
from sao_core.store import atomic, shards, storage
from sao_core.store.shards import ShardManifest

ROWS = [
    {
        "prompt": [{"role": "user", "content": "héllo"}],
        "chosen": [{"role": "assistant", "content": "a"}],
        "n": 1,
    },
    {
        "prompt": [{"role": "user", "content": "two"}],
        "chosen": [{"role": "assistant", "content": "b"}],
        "n": 2,
    },
]


def _entry(i=0):
    return ShardManifest(stage="pairs", shard=i, rows_in=len(ROWS))


@pytest.fixture(params=["jsonl", "parquet"])
def fmt(request):
    return request.param


def roundtrip(base, fmt):
    url = storage.join(base, "pairs")
    entry = shards.write_shard(url, 0, ROWS, [{"drop_reason": "x"}], fmt, _entry())
    assert entry.sha256 and entry.rows_out == 2 and entry.dropped_file == "_dropped/dropped-00000.jsonl"
    rows, back = shards.read_shard(url, 0, fmt)
    assert rows == ROWS and back.sha256 == entry.sha256
    shards.write_stage_manifest(url, "pairs", [entry], format=fmt)
    assert shards.read_stage_rows(url, fmt) == ROWS
    assert shards.data_files(url, fmt) == [storage.join(url, f"part-00000.{fmt}")]
    return url


def test_roundtrip_memory(fmt):
    roundtrip(f"memory://rt-{fmt}", fmt)


def test_roundtrip_local_and_datasets_reads_it(tmp_path, fmt):
    import datasets

    url = roundtrip(str(tmp_path), fmt)
    ds = datasets.load_dataset(
        "json" if fmt == "jsonl" else "parquet", data_files=shards.data_files(url, fmt)
    )
    assert ds["train"][0]["prompt"][0]["content"] == "héllo"
    assert not list(tmp_path.rglob("*.tmp-*"))  # atomic writes leave no temporaries


def test_tampered_shard_fails_its_hash(tmp_path):
    url = roundtrip(str(tmp_path), "jsonl")
    (tmp_path / "pairs" / "part-00000.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    with pytest.raises(ManifestError, match=r"part-00000\.jsonl does not match its manifest: sha256"):
        shards.read_shard(url, 0, "jsonl")
    assert shards.shard_is_done(url, 0, "", "") is None


def test_missing_shard_and_unfinished_stage(tmp_path):
    url = roundtrip(str(tmp_path), "jsonl")
    (tmp_path / "pairs" / "part-00000.jsonl").unlink()
    with pytest.raises(ManifestError, match="listed in its manifest but missing"):
        shards.read_shard(url, 0, "jsonl")
    with pytest.raises(StorageError, match=r"has no manifest\.json"):
        shards.read_stage_manifest(str(tmp_path / "prompts"))
    with pytest.raises(StorageError, match="not finished"):
        shards.read_shard(str(tmp_path / "prompts"), 0, "jsonl")


def test_unreadable_shard_names_the_file():
    with pytest.raises(StorageError, match=r"unreadable shard memory://x/part-00000\.jsonl: line 2"):
        shards.decode_rows(b'{"a": 1}\n{not json\n', "jsonl", "memory://x/part-00000.jsonl")
    with pytest.raises(StorageError, match=r"unreadable shard p\.parquet"):
        shards.decode_rows(b"PAR1 torn", "parquet", "p.parquet")


def test_malformed_manifest(tmp_path):
    url = roundtrip(str(tmp_path), "jsonl")
    storage.write_json(shards.shard_manifest_url(url, 0), {"stage": "pairs", "bogus": 1})
    with pytest.raises(ManifestError, match="malformed shard manifest"):
        shards.read_shard(url, 0, "jsonl")
    storage.write_text(storage.join(url, "manifest.json"), "{")
    with pytest.raises(StorageError, match="not valid JSON"):
        shards.read_stage_manifest(url)


def test_row_count_mismatch(tmp_path):
    url = roundtrip(str(tmp_path), "jsonl")
    entry = shards.read_shard_manifest(url, 0)
    entry.rows_out = 5
    storage.write_json(shards.shard_manifest_url(url, 0), entry.__dict__)
    with pytest.raises(ManifestError, match="has 2 rows, its manifest says 5"):
        shards.read_shard(url, 0, "jsonl")


def test_shard_is_done_checks_inputs_and_settings(tmp_path):
    url = storage.join(str(tmp_path), "s")
    e = _entry()
    e.input_sha256, e.settings_hash = "in1", "p1"
    shards.write_shard(url, 0, ROWS, [], "jsonl", e)
    assert shards.shard_is_done(url, 0, "in1", "p1") is not None
    assert shards.shard_is_done(url, 0, "in2", "p1") is None
    assert shards.shard_is_done(url, 0, "in1", "p2") is None
    assert shards.shard_is_done(url, 1, "in1", "p1") is None


def test_a_shard_manifest_written_before_the_settings_hash_rename_still_counts_as_done(tmp_path):
    url = storage.join(str(tmp_path), "s")
    e = _entry()
    e.input_sha256, e.settings_hash = "in1", "p1"
    shards.write_shard(url, 0, ROWS, [], "jsonl", e)
    old = storage.read_json(shards.shard_manifest_url(url, 0))
    old["params_hash"] = old.pop("settings_hash")
    storage.write_json(shards.shard_manifest_url(url, 0), old)
    assert shards.read_shard_manifest(url, 0).settings_hash == "p1"
    assert shards.shard_is_done(url, 0, "in1", "p1") is not None
    assert shards.shard_is_done(url, 0, "in1", "p2") is None


def test_unknown_format():
    with pytest.raises(ValueError, match="allowed: jsonl, parquet"):
        shards.encode_rows([], "csv")


def test_list_files_memory_and_local(tmp_path):
    storage.write_text("memory://lf/a/x.txt", "1")
    storage.write_text("memory://lf/a/y.txt", "2")
    assert storage.list_files("memory://lf/a", "*.txt") == ["memory://lf/a/x.txt", "memory://lf/a/y.txt"]
    storage.write_text(str(tmp_path / "q.txt"), "1")
    assert storage.list_files(str(tmp_path), "*.txt") == [str(tmp_path / "q.txt")]


@pytest.mark.tier1
def test_roundtrip_on_real_s3(s3_env, fmt):
    """The same round trip against moto's S3 server on 127.0.0.1 through s3fs."""
    import datasets

    url = roundtrip(f"{s3_env}/round", fmt)
    assert storage.exists(storage.join(url, "manifest.json"))
    files = shards.data_files(url, fmt)
    assert files[0].startswith("s3://")
    ds = datasets.load_dataset(
        "json" if fmt == "jsonl" else "parquet",
        data_files=files,
        storage_options={"client_kwargs": {"endpoint_url": __import__("os").environ["AWS_ENDPOINT_URL"]}},
    )
    assert ds["train"].num_rows == 2


# --- create-only writes (the campaign's promotion records) -----------------------------------------------


def _create_twice(url):
    atomic.write_bytes_exclusive(url, b"first")
    with pytest.raises(StorageConflict, match="already exists"):
        atomic.write_bytes_exclusive(url, b"second")
    assert storage.read_bytes(url) == b"first"


def test_write_bytes_exclusive_local_and_memory(tmp_path):
    _create_twice(str(tmp_path / "records" / "000001.json"))  # the folder is made on the way
    assert sorted(p.name for p in (tmp_path / "records").iterdir()) == ["000001.json"]  # no temporaries
    _create_twice(f"memory://exclusive-{tmp_path.name}/000001.json")


@pytest.mark.parametrize("where", ["local", "memory"])
def test_write_bytes_exclusive_lets_one_of_many_racing_writers_win(tmp_path, where):
    url = str(tmp_path / "x.json") if where == "local" else f"memory://race-{tmp_path.name}/x.json"
    writers = 8
    barrier = threading.Barrier(writers)
    outcomes: list[str] = []

    def write(i: int) -> None:
        barrier.wait(timeout=30)
        try:
            atomic.write_bytes_exclusive(url, f"writer {i}".encode())
            outcomes.append(f"won {i}")
        except StorageConflict:
            outcomes.append("lost")

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    [winner] = [o for o in outcomes if o.startswith("won")]
    assert outcomes.count("lost") == writers - 1
    assert storage.read_bytes(url) == f"writer {winner.split()[1]}".encode()


def test_manifest_digest_is_the_sha256_over_the_shard_hashes(tmp_path):
    url = roundtrip(str(tmp_path), "jsonl")
    manifest = shards.read_stage_manifest(url)
    shas = [e["sha256"] for e in manifest["shards"]]
    assert shards.manifest_digest(manifest) == hashlib.sha256("\x1f".join(shas).encode()).hexdigest()


@pytest.mark.tier1
def test_write_bytes_exclusive_on_real_s3_is_a_conditional_put(s3_env):
    _create_twice(f"{s3_env}/records/000001.json")
    # Another process's write shows up once this process forgets its cached listing.
    import s3fs

    storage.list_files(f"{s3_env}/records", "*.json")
    s3fs.S3FileSystem(skip_instance_cache=True).pipe_file(
        f"{s3_env.removeprefix('s3://')}/records/b.json", b"x"
    )
    storage.forget_listing(f"{s3_env}/records")
    assert len(storage.list_files(f"{s3_env}/records", "*.json")) == 2


def _conditional_writes(url: str) -> None:
    atomic.write_bytes_exclusive(url, b"v1")
    atomic.replace_if(url, b"v1", b"v2")
    assert storage.read_bytes(url) == b"v2"
    with pytest.raises(StorageConflict, match="changed by another writer"):
        atomic.replace_if(url, b"v1", b"v3")  # it moved on since "v1" was read
    with pytest.raises(StorageConflict, match="changed by another writer"):
        atomic.remove_if(url, b"v1")
    assert storage.read_bytes(url) == b"v2"
    assert atomic.remove_if(url, b"v2") is True
    assert not storage.exists(url)
    assert atomic.remove_if(url, b"v2") is False  # already gone: nothing to remove
    with pytest.raises(StorageConflict, match="removed by another writer"):
        atomic.replace_if(url, b"v2", b"v3")
    assert not storage.exists(url)


def test_conditional_replace_and_remove_local_and_memory(tmp_path):
    _conditional_writes(str(tmp_path / "lease.json"))
    _conditional_writes(f"memory://conditional-{tmp_path.name}/lease.json")


@pytest.mark.tier1
def test_conditional_replace_and_remove_on_real_s3_use_if_match(s3_env):
    _conditional_writes(f"{s3_env}/leases/lease.json")


@pytest.mark.parametrize("url", ["gs://bucket/art/_lock.json", "az://container/art/_lock.json"])
def test_stores_without_an_atomic_create_are_refused_by_name(url):
    # fsspec's create mode on gs:// checks, then writes: two writers could both pass, so leases and
    # campaign records are refused there rather than trusted.
    scheme = url.split("://")[0]
    with pytest.raises(StorageError, match=rf"{scheme}:// offers no atomic conditional write"):
        atomic.write_bytes_exclusive(url, b"x")
    with pytest.raises(StorageError, match=rf"{scheme}:// offers no atomic conditional write"):
        atomic.replace_if(url, b"x", b"y")
    with pytest.raises(StorageError, match=rf"{scheme}:// offers no atomic conditional write"):
        atomic.remove_if(url, b"x")
