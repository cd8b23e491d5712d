"""Faults of the artifact store and the disk under it, on real processes on 127.0.0.1: each round either
completes with every count exact (checked by ids, shard by shard) or fails naming the file it could not
read or write, and a re-run completes it without redoing the shards that had finished.

- S3 (moto) behind tests/reliability/faultproxy.py: a share of requests answered 500/503 or their replies
  dropped after the store did the work; the endpoint down for a few seconds mid-stage; moto itself
  stopped and started again mid-stage; down for longer than storage's tries (TransientStorageError,
  which the orchestrator retries; the re-run resumes); a create-only write whose reply was lost;
- a shard file (or its dropped rows) corrupted or truncated after it was written: found by its sha256,
  that shard alone made again, locally and on S3;
- the disk under a local root full mid-stage (a 4 MiB tmpfs, or a loop-mounted ext4 image): a
  StorageError naming the file and "no space left", no torn file counted as done, and after space is
  freed a re-run that redoes only what had not finished;
- a whole `sao run` (Prefect, scripted engine, tiny recipe) with its root on the faulty endpoint.

    .venv/bin/python -m pytest -q tests/reliability/test_storage_faults.py
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from sao_core.chat import ChatRequest, Completion, Sampling
from sao_core.config import RoundConfig, build_config
from sao_core.engines.fake import FakeEngine
from sao_core.engines.provider import EngineProvider
from sao_core.errors import StorageError, TransientStorageError
from sao_core.stages.synth import run_synth
from sao_core.store import atomic, shards, storage
from sao_core.store.layout import MODEL_STAGES, load_config, round_url, stage_url
from sao_core.training import default_output_url

if TYPE_CHECKING:  # pytest loads the conftest itself: importing it again would make a second copy
    from tests.reliability.conftest import FaultyS3, SmallDisk

REPO = Path(__file__).parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")
PERSONAS = 8
SHARDS = 4  # PERSONAS / run.shard_size: every model stage has 4 shards


# --- a round, and what makes it exact -----------------------------------------------------------------------


def fault_cfg(root: str, *overrides: str) -> RoundConfig:
    """A small round whose scripted engine drops rows at every stage, so dropped files are written too."""
    return build_config(
        {
            "run": {"root": root, "campaign": "faults", "shard_size": PERSONAS // SHARDS},
            "engine": {"name": "fake"},
            "personas": {"n": PERSONAS},
            "prompts": {"max_tokens": 64},
            "responses": {"max_tokens": 128},
        },
        [
            "engine.fake.malformed_judge_rate=0.25",
            "engine.fake.duplicate_prompt_rate=0.2",
            "engine.fake.missing_prefix_rate=0.1",
            "engine.fake.identical_response_rate=0.15",
            *overrides,
        ],
    )


class ScriptedEngine(FakeEngine):
    """The fake engine, recording the requests it answers by kind, and running `at[(kind, n)]` just before
    its n-th call of that kind (a fault started mid-stage, between two shards)."""

    def __init__(self, cfg: RoundConfig, at: dict[tuple[str, int], Callable[[], None]] | None = None):
        super().__init__(cfg.engine.fake, model=cfg.model.path, seed=cfg.run.seed)
        self.at = at or {}
        self.calls_by_kind: Counter[str] = Counter()
        self.seen: dict[str, list[str]] = {}

    def generate(self, requests: Sequence[ChatRequest], sampling: Sampling) -> list[list[Completion]]:
        kind = requests[0].kind if requests else "none"
        self.calls_by_kind[kind] += 1
        hook = self.at.get((kind, self.calls_by_kind[kind]))
        if hook is not None:
            hook()
        self.seen.setdefault(kind, []).extend(r.request_id for r in requests)
        return super().generate(requests, sampling)


def synth(cfg: RoundConfig, engine: ScriptedEngine | None = None) -> str:
    engine = engine or ScriptedEngine(cfg)
    return run_synth(cfg, EngineProvider(cfg, lambda: engine)).round_url


# (folder whose shards answer the shards of another, that other folder, the id a row is known by)
CHAINS = (
    ("prompts/_candidates", "personas", "persona_id"),
    ("prompts", "prompts/_candidates", "prompt_id"),  # the round-wide duplicate pass
    ("responses", "prompts", "prompt_id"),
    ("judgements", "responses", "prompt_id"),
    ("pairs", "judgements", "prompt_id"),
)
STAGES = ("personas", *MODEL_STAGES, "pairs")


def _dropped_rows(url: str, entry: shards.ShardManifest) -> list[dict[str, Any]]:
    if not entry.dropped_file:
        return []
    shards.verify_dropped(url, entry)
    return shards.decode_rows(storage.read_bytes(storage.join(url, entry.dropped_file)), "jsonl", url)


def check_round_exactly_once(round_dir: str, personas: int = PERSONAS) -> int:
    """Every shard verifies; every row of an input shard is answered exactly once by the matching output
    shard (kept or dropped, by id), no id twice in a stage; every manifest's counts are its files'; no
    file beside those the manifests name. Returns how many row ids were compared."""
    storage.forget_listing(round_dir)
    checked = 0
    rows, _ = _stage_rows(round_dir, "personas")
    ids = [r["persona_id"] for r in rows]
    assert len(ids) == len(set(ids)) == personas, f"personas: {len(ids)} rows, {len(set(ids))} ids"
    checked += len(ids)
    for out_name, in_name, key in CHAINS:
        out_url, in_url = storage.join(round_dir, out_name), storage.join(round_dir, in_name)
        kept: list[str] = []
        for index in range(SHARDS):
            in_rows, in_entry = shards.read_shard(in_url, index, "jsonl")
            out_rows, entry = shards.read_shard(out_url, index, "jsonl")
            dropped = _dropped_rows(out_url, entry)
            answered = [r[key] for r in out_rows] + [r[key] for r in dropped]
            assert sorted(answered) == sorted(r[key] for r in in_rows), f"{out_name} shard {index}: rows lost"
            assert entry.rows_out == len(out_rows), (out_name, index)
            assert entry.rows_in == entry.rows_out + sum(entry.drops.values()), (out_name, index)
            if out_name == "prompts":  # counted from the personas: parse drops, then duplicates
                assert entry.rows_in == in_entry.rows_in, index
                assert sum(entry.drops.values()) == sum(in_entry.drops.values()) + len(dropped), index
            else:
                assert entry.rows_in == len(in_rows), (out_name, index)
                assert sum(entry.drops.values()) == len(dropped), (out_name, index)
            kept += [r[key] for r in out_rows]
            checked += len(answered)
        twice = [i for i, n in Counter(kept).items() if n > 1]
        assert not twice, f"{out_name}: ids written twice: {twice}"
    summary = storage.read_json(storage.join(round_dir, "manifest.json"))["stages"]
    for stage in STAGES:
        rows, manifest = _stage_rows(round_dir, stage)
        assert manifest["num_shards"] == SHARDS, stage
        assert manifest["rows_out"] == len(rows) == summary[stage]["rows_out"], stage
        assert (
            manifest["rows_in"] == sum(e["rows_in"] for e in manifest["shards"]) == summary[stage]["rows_in"]
        )
        for raw in manifest["shards"]:
            on_disk = shards.read_shard_manifest(stage_url(round_dir, stage), int(raw["shard"]))
            assert on_disk is not None, (stage, raw["shard"])
            # seconds aside: run_personas puts the sampling time on shard 0 in the stage manifest only
            assert {**raw, "seconds": 0} == {**on_disk.__dict__, "seconds": 0}, (stage, raw["shard"])
    for folder in ("personas", "prompts/_candidates", "prompts", "responses", "judgements", "pairs"):
        url = storage.join(round_dir, folder)
        names = sorted(u.rsplit("/", 1)[-1] for u in storage.list_files(url, "*"))
        data = [n for n in names if n.startswith("part-")]
        assert data == [f"part-{i:05d}.jsonl" for i in range(SHARDS)], (folder, names)
        assert set(names) - set(data) <= {"_shards", "_dropped", "_candidates", "_claims", "manifest.json"}, (
            names
        )
    return checked


def _stage_rows(round_dir: str, stage: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    url = stage_url(round_dir, stage)
    return shards.read_stage_rows(url, "jsonl"), shards.read_stage_manifest(url)


def shard_shas(round_dir: str) -> dict[str, list[str]]:
    """Every stage's shard hashes: the round's content (the round folder's name is not part of it)."""
    return {s: [e["sha256"] for e in _stage_rows(round_dir, s)[1]["shards"]] for s in STAGES}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """The same round on a local folder, with no fault: what every faulty run must end up with."""
    round_dir = synth(fault_cfg(str(tmp_path_factory.mktemp("baseline"))))
    check_round_exactly_once(round_dir)
    return shard_shas(round_dir)


def prompt_ids_of(round_dir: str, indices: Sequence[int]) -> list[str]:
    url = stage_url(round_dir, "prompts")
    return sorted(r["prompt_id"] for i in indices for r in shards.read_shard(url, i, "jsonl")[0])


def no_temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp-" in p.name]


# --- storage's own tries, without a server -------------------------------------------------------------------


class FlakyFileSystem(MemoryFileSystem):
    """memory://, under a protocol of its own, that fails the next `failures` calls like an endpoint that
    refuses connections (or answers with `error`)."""

    protocol = ("flaky",)
    store: ClassVar[dict[str, Any]] = {}  # its own files, not memory://'s
    pseudo_dirs: ClassVar[list[str]] = [""]
    failures = 0
    error: Callable[[], BaseException] = lambda: ConnectionRefusedError(errno.ECONNREFUSED, "refused")
    calls = 0

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(str(path).removeprefix("flaky://"))

    def _fault(self) -> None:
        type(self).calls += 1
        if type(self).failures > 0:
            type(self).failures -= 1
            raise type(self).error()

    def cat_file(self, path, *args, **kwargs):
        self._fault()
        return super().cat_file(path, *args, **kwargs)

    def pipe_file(self, path, *args, **kwargs):
        self._fault()
        return super().pipe_file(path, *args, **kwargs)

    def exists(self, path, **kwargs):
        self._fault()
        return super().exists(path, **kwargs)


@pytest.fixture
def flaky(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[FlakyFileSystem]]:
    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)
    monkeypatch.setattr(storage, "TRANSIENT_WAIT_S", 0.01)
    FlakyFileSystem.failures, FlakyFileSystem.calls = 0, 0
    FlakyFileSystem.error = lambda: ConnectionRefusedError(errno.ECONNREFUSED, "refused")
    yield FlakyFileSystem
    FlakyFileSystem.failures = 0


def test_a_store_that_fails_a_few_times_is_tried_again(flaky: type[FlakyFileSystem]) -> None:
    flaky.failures = storage.TRANSIENT_TRIES - 1
    storage.write_bytes("flaky://bucket/a.json", b"{}")
    assert flaky.calls == storage.TRANSIENT_TRIES
    flaky.failures = 2
    flaky.error = lambda: OSError(errno.EREMOTEIO, "We encountered an internal error")  # s3fs's 500
    assert storage.read_bytes("flaky://bucket/a.json") == b"{}"


def test_a_store_that_keeps_failing_is_a_transient_error_naming_the_file(
    flaky: type[FlakyFileSystem],
) -> None:
    flaky.failures = 100
    with pytest.raises(
        TransientStorageError, match=r"cannot write flaky://bucket/b\.json: .* failed 4 tries"
    ):
        storage.write_bytes("flaky://bucket/b.json", b"{}")
    assert flaky.calls == storage.TRANSIENT_TRIES  # bounded in tries
    # A transient failure is no answer: it is not read as "missing" or "not done".
    with pytest.raises(TransientStorageError, match=r"cannot read flaky://bucket/b\.json"):
        storage.read_bytes("flaky://bucket/b.json")
    with pytest.raises(TransientStorageError, match=r"cannot check flaky://bucket/b\.json"):
        storage.exists("flaky://bucket/b.json")


def test_no_new_try_starts_past_the_time_limit(
    flaky: type[FlakyFileSystem], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each try may itself take minutes (botocore's read timeouts on an endpoint that never answers)."""
    monkeypatch.setattr(storage, "TRANSIENT_GIVE_UP_S", 0.3)
    monkeypatch.setattr(storage, "TRANSIENT_WAIT_S", 0.2)
    flaky.failures = 100
    with pytest.raises(TransientStorageError, match="failed 2 tries"):
        storage.write_bytes("flaky://bucket/d.json", b"{}")
    assert flaky.calls == 2  # waits of 0.2 s then 0.4 s: the third try would start past 0.3 s


def test_an_answer_from_the_store_is_not_tried_again(flaky: type[FlakyFileSystem]) -> None:
    flaky.failures = 1
    flaky.error = lambda: PermissionError("Access Denied")
    with pytest.raises(PermissionError):
        storage.write_bytes("flaky://bucket/c.json", b"{}")
    assert flaky.calls == 1
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("flaky://bucket/nothing.json")


def test_the_orchestrator_retries_a_transient_storage_error_and_not_a_storage_error() -> None:
    from prefect.states import Failed

    from tasks.cache import retry_unless_permanent

    assert not issubclass(TransientStorageError, StorageError)
    transient = TransientStorageError("cannot write s3://b/responses/part-00001.jsonl: ...")
    transient.__cause__ = OSError(errno.EREMOTEIO, "InternalError")
    assert retry_unless_permanent(None, None, Failed(data=transient))  # type: ignore[arg-type]
    full = StorageError("cannot write /r/part-00001.jsonl: no space left on the device")
    assert not retry_unless_permanent(None, None, Failed(data=full))  # type: ignore[arg-type]
    for error in (
        ConnectionResetError(),
        OSError(errno.EBUSY, "SlowDown"),
        OSError(errno.EIO, "BadGateway"),
        TimeoutError(),
    ):
        assert storage.is_transient(error), error
    for error in (FileNotFoundError(), FileExistsError(), PermissionError(), OSError(errno.EINVAL, "x")):
        assert not storage.is_transient(error), error


# --- corrupted and truncated shards ---------------------------------------------------------------------------


def _tear(url: str, how: str) -> None:
    data = storage.read_bytes(url)
    if how == "truncated":
        storage.write_bytes(url, data[: len(data) // 2])  # cut mid-row
    else:
        flipped = bytearray(data)
        flipped[len(data) // 3] ^= 0x20  # one bit, inside a row's text
        storage.write_bytes(url, bytes(flipped))


def _corrupt_and_rerun(root: str, baseline: dict[str, list[str]]) -> int:
    cfg = fault_cfg(root)
    round_dir = synth(cfg)
    assert shard_shas(round_dir) == baseline
    responses, judgements = stage_url(round_dir, "responses"), stage_url(round_dir, "judgements")
    _tear(storage.join(responses, "part-00001.jsonl"), "truncated")
    _tear(storage.join(judgements, "part-00002.jsonl"), "corrupted")
    with pytest.raises(StorageError, match=r"responses/part-00001\.jsonl does not match its manifest"):
        shards.read_shard(responses, 1, "jsonl")
    # The dropped rows of a shard are checked too: a torn dropped file would lose rows from the counts.
    torn_dropped = next(
        (i, e) for i in range(SHARDS) if (e := shards.read_shard_manifest(responses, i)) and e.dropped_file
    )
    _tear(storage.join(responses, torn_dropped[1].dropped_file or ""), "truncated")

    again = ScriptedEngine(cfg)
    round_dir2 = synth(cfg, again)
    assert round_dir2 == round_dir
    redone = sorted({1, torn_dropped[0]})
    assert again.calls_by_kind == {"response": len(redone), "judge": 1}, again.calls_by_kind
    assert sorted(again.seen["response"]) == prompt_ids_of(round_dir, redone)
    assert shard_shas(round_dir) == baseline  # made again, byte for byte
    return check_round_exactly_once(round_dir)


def test_a_corrupted_or_truncated_local_shard_is_made_again_alone(
    tmp_path: Path, baseline: dict[str, list[str]]
) -> None:
    _corrupt_and_rerun(str(tmp_path), baseline)


@pytest.mark.tier1
def test_a_corrupted_or_truncated_shard_on_s3_is_made_again_alone(
    faulty_s3: FaultyS3, baseline: dict[str, list[str]]
) -> None:
    _corrupt_and_rerun(f"{faulty_s3.root}/rounds", baseline)


# --- an S3 endpoint that fails ------------------------------------------------------------------------------


@pytest.mark.tier1
def test_a_round_survives_5xx_answers_and_lost_replies(
    faulty_s3: FaultyS3, baseline: dict[str, list[str]]
) -> None:
    proxy = faulty_s3.proxy
    proxy.error_rate, proxy.drop_rate = 0.05, 0.02
    round_dir = synth(fault_cfg(f"{faulty_s3.root}/rounds"))
    proxy.calm()
    faults = proxy.counts["errors"] + proxy.counts["drops"]
    assert proxy.counts["errors"] >= 5 and proxy.counts["drops"] >= 2, proxy.counts
    assert shard_shas(round_dir) == baseline
    rows = check_round_exactly_once(round_dir)
    print(
        f"\n5xx and lost replies: {faults} faults in {proxy.counts['requests']} requests, {rows} ids checked"
    )


@pytest.mark.tier1
def test_a_round_survives_the_endpoint_going_down_mid_stage(
    faulty_s3: FaultyS3, baseline: dict[str, list[str]]
) -> None:
    proxy = faulty_s3.proxy
    cfg = fault_cfg(f"{faulty_s3.root}/rounds")
    # Down for 4 s just before the second shard of responses is answered (and so written).
    engine = ScriptedEngine(cfg, at={("response", 2): lambda: proxy.outage(4.0)})
    round_dir = synth(cfg, engine)
    assert proxy.counts["downs"] == 1
    assert shard_shas(round_dir) == baseline
    check_round_exactly_once(round_dir)


@pytest.mark.tier1
def test_a_round_survives_the_store_stopped_and_started_again_mid_stage(
    faulty_s3: FaultyS3, baseline: dict[str, list[str]]
) -> None:
    cfg = fault_cfg(f"{faulty_s3.root}/rounds")
    # moto stopped before the third judge call, started again 8 s later; meanwhile the proxy answers 502.
    # Longer than botocore's own retries usually last (4 retries, about 7.5 s of backoff on average):
    # storage's tries carry the round through.
    engine = ScriptedEngine(cfg, at={("judge", 3): lambda: faulty_s3.restart_store(after_s=8.0)})
    round_dir = synth(cfg, engine)
    assert faulty_s3.proxy.counts["bad_gateway"] > 0, faulty_s3.proxy.counts
    assert shard_shas(round_dir) == baseline
    check_round_exactly_once(round_dir)


@pytest.mark.tier1
def test_an_endpoint_down_too_long_fails_naming_the_file_and_the_rerun_resumes(
    faulty_s3: FaultyS3, baseline: dict[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    import s3fs

    # Fewer and shorter tries, so that "too long" is a few seconds here.
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    monkeypatch.setattr(storage, "TRANSIENT_TRIES", 2)
    monkeypatch.setattr(storage, "TRANSIENT_WAIT_S", 0.2)
    s3fs.S3FileSystem.clear_instance_cache()
    proxy = faulty_s3.proxy
    # The failed run cannot release its claim on shard 2 (the store is down), and its process (this one)
    # is alive, so the claim holds until it expires: claim_ttl is engine.shard_timeout_s when that is
    # shorter than locks.LEASE_TTL_S (120 s). It is 5 s here; the store's settings hash leaves it out.
    cfg = fault_cfg(f"{faulty_s3.root}/rounds", "engine.shard_timeout_s=5")
    engine = ScriptedEngine(cfg, at={("response", 3): proxy.down})
    # The failed part is named: shard 2 of responses (its file, or the claim it is written under).
    with pytest.raises(TransientStorageError, match=r"cannot \w+ s3://\S+/responses/\S*part-00002\.json"):
        synth(cfg, engine)
    proxy.up()
    round_dir = round_url(cfg)
    assert shards.read_shard_manifest(stage_url(round_dir, "responses"), 2) is None
    assert not storage.exists(storage.join(stage_url(round_dir, "responses"), "manifest.json"))

    again = ScriptedEngine(cfg)
    started = time.monotonic()
    synth(cfg, again)
    assert time.monotonic() - started < 30  # the stale claim waited out, not more
    assert again.calls_by_kind == {"response": 2, "judge": SHARDS}, again.calls_by_kind  # prompts: none
    assert sorted(again.seen["response"]) == prompt_ids_of(round_dir, [2, 3])
    assert shard_shas(round_dir) == baseline
    check_round_exactly_once(round_dir)


@pytest.mark.tier1
def test_a_create_only_write_whose_reply_was_lost_is_ours_not_a_conflict(faulty_s3: FaultyS3) -> None:
    """The campaign's promotion records: a lost reply makes botocore send the PUT again, which the store
    refuses (the key holds our record now). Read as a conflict, the campaign would take the next
    number and write the same promotion twice."""
    from sao_core.errors import StorageConflict

    proxy = faulty_s3.proxy
    url = f"{faulty_s3.root}/promotions/000001.json"
    proxy.drop_next = 1  # the PUT reaches the store, its reply does not come back
    atomic.write_bytes_exclusive(url, b'{"seq": 1, "who": "a"}')
    assert proxy.counts["drops"] == 1, proxy.counts
    assert storage.read_bytes(url) == b'{"seq": 1, "who": "a"}'
    with pytest.raises(StorageConflict, match="already exists"):
        atomic.write_bytes_exclusive(url, b'{"seq": 1, "who": "b"}')


# --- a full disk --------------------------------------------------------------------------------------------


@pytest.mark.tier1
def test_a_full_disk_fails_naming_the_file_and_the_rerun_resumes(
    small_disk: SmallDisk, baseline: dict[str, list[str]]
) -> None:
    cfg = fault_cfg(str(small_disk.path / "rounds"))
    ballast: list[Path] = []
    engine = ScriptedEngine(cfg, at={("response", 3): lambda: ballast.append(small_disk.fill())})
    with pytest.raises(StorageError, match=r"cannot write .*/responses/part-00002\.jsonl: no space left"):
        synth(cfg, engine)
    round_dir = round_url(cfg)
    responses = stage_url(round_dir, "responses")
    # Nothing torn counts as done, and no temporary is left behind.
    assert [shards.shard_is_done(responses, i, "", "") is not None for i in range(SHARDS)] == [False] * 4
    done = [shards.read_shard_manifest(responses, i) for i in range(SHARDS)]
    assert [d is not None for d in done] == [True, True, False, False]
    for i in (0, 1):
        shards.read_shard(responses, i, "jsonl")  # verifies
    assert not no_temporaries(small_disk.path)
    assert not (Path(responses) / "part-00002.jsonl").exists()

    ballast[0].unlink()
    again = ScriptedEngine(cfg)
    synth(cfg, again)
    assert again.calls_by_kind == {"response": 2, "judge": SHARDS}, again.calls_by_kind
    assert sorted(again.seen["response"]) == prompt_ids_of(round_dir, [2, 3])
    assert shard_shas(round_dir) == baseline
    check_round_exactly_once(round_dir)
    assert not no_temporaries(small_disk.path)


@pytest.mark.tier1
def test_a_full_disk_never_leaves_a_torn_file_under_its_name(small_disk: SmallDisk) -> None:
    """A write bigger than the space left: the old file stays whole, no temporary stays behind."""
    url = str(small_disk.path / "stage" / "manifest.json")
    storage.write_text(url, "old\n")
    small_disk.fill()
    with pytest.raises(StorageError, match=r"cannot write .*/stage/manifest\.json: no space left"):
        storage.write_bytes(url, b"x" * 1_000_000)
    with pytest.raises(StorageError, match="no space left"):
        atomic.write_bytes_exclusive(str(small_disk.path / "stage" / "record.json"), b"y" * 100_000)
    assert storage.read_text(url) == "old\n"
    assert not (small_disk.path / "stage" / "record.json").exists()
    assert not no_temporaries(small_disk.path)


# --- a whole `sao run` on a faulty endpoint ------------------------------------------------------------------


@pytest.mark.tier1
def test_sao_run_completes_on_a_faulty_endpoint_with_exact_counts(
    faulty_s3: FaultyS3, tmp_path: Path
) -> None:
    proxy = faulty_s3.proxy
    overrides = [
        f"run.root={faulty_s3.root}/rounds",
        f"personas.n={PERSONAS}",
        f"run.shard_size={PERSONAS // SHARDS}",
        "evaluation.enabled=false",
        "training.max_steps=1",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        faulty_s3.env,
        PREFECT_HOME=str(tmp_path / "prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        SAO_CACHE=str(tmp_path / "cache"),
        HF_HUB_OFFLINE="1",
    )
    round_dir = round_url(load_config(TINY, overrides))
    proxy.error_rate, proxy.drop_rate = 0.03, 0.01
    # The endpoint goes down for 4 s once the first shard of responses is written (watched on moto itself,
    # past the proxy): mid-stage, with Prefect's task results on the same endpoint.
    watcher = threading.Thread(
        target=_outage_when,
        args=(faulty_s3, f"{round_dir}/responses/_shards/part-00000.json", 4.0),
        daemon=True,
    )
    watcher.start()
    sao = Path(sys.executable).parent / "sao"
    args = [str(sao), "run", "--config", TINY]
    for o in overrides:
        args += ["--set", o]
    run = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    watcher.join(timeout=10)
    proxy.calm()
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert proxy.counts["errors"] > 0 and proxy.counts["drops"] > 0, proxy.counts
    assert proxy.counts["downs"] == 1, "the outage never started: the round ended before responses?"
    assert f"round folder: {round_dir}" in run.stdout
    rows = check_round_exactly_once(round_dir)
    model = storage.read_json(storage.join(default_output_url(load_config(TINY, overrides)), "manifest.json"))
    assert model["steps"] == 1, model
    print(f"\nsao run: {dict(proxy.counts)}, {rows} ids checked")


def _outage_when(faulty_s3: FaultyS3, url: str, seconds: float, timeout_s: float = 300.0) -> None:
    import s3fs

    direct = s3fs.S3FileSystem(skip_instance_cache=True, endpoint_url=faulty_s3.store.url)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        direct.invalidate_cache()
        if direct.exists(url):
            faulty_s3.proxy.outage(seconds)
            return
        time.sleep(0.2)
