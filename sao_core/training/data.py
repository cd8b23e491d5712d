"""Pairs to train on: find the files, load and check them with datasets, measure and drop long rows.

A pair row is TRL's conversational preference format: `prompt` (messages ending with a user turn),
`chosen` and `rejected` (assistant messages). Errors name the file, line and column.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sao_core.config import TrainingConfig
from sao_core.errors import StorageError, TrainingError
from sao_core.store import shards, storage

if TYPE_CHECKING:
    from datasets import Dataset

PAIR_COLUMNS = ("prompt", "chosen", "rejected")
ROW_COLUMN = "sao_row"  # our row index, carried through TRL's collator to see which rows each rank trains on
_MESSAGE_RULES = {
    "prompt": (("system", "user", "assistant", "tool"), "user"),
    "chosen": (("assistant",), None),
    "rejected": (("assistant",), None),
}


def quiet_libraries() -> None:
    """No progress bars from datasets and transformers, no warning for TRL's experimental trainers."""
    # trl.experimental is where TRL 1.16 keeps CPO (SimPO) and ORPO: we import it on purpose.
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


@dataclass
class Pairs:
    """Validated pairs: the rows to train on, their token counts, and what was dropped."""

    dataset: Dataset
    files: list[str]
    sha256: str
    rows_in: int
    prompt_ids: list[str]  # by ROW_COLUMN value
    tokens: list[int]  # prompt+chosen plus prompt+rejected tokens, by ROW_COLUMN value
    drops: dict[str, int] = field(default_factory=dict)
    # The tokenizer that measured the rows: the trainer reuses it instead of loading the model's again.
    tokenizer: Any = None


def find_pair_files(url: str) -> list[str]:
    """The shard URLs of a pairs folder (its manifest, else part-*.jsonl / *.parquet) or the one file."""
    url = url.rstrip("/")
    fs, path = storage.url_to_fs(url)
    if fs.isfile(path):
        return [url]
    if not fs.isdir(path):
        raise TrainingError(f"pairs {url} not found")
    if storage.exists(storage.join(url, "manifest.json")):
        try:
            manifest = shards.read_stage_manifest(url)
        except StorageError as e:
            raise TrainingError(f"pairs {url}: {e}") from e
        files = [storage.join(url, entry["file"]) for entry in manifest["shards"]]
    else:
        files = storage.list_files(url, "part-*.jsonl") or storage.list_files(url, "*.parquet")
        files = files or storage.list_files(url, "*.jsonl")
    if not files:
        raise TrainingError(f"pairs {url} holds no pair files (part-*.jsonl, *.parquet or a manifest.json)")
    return files


def pairs_sha256(url: str) -> str:
    """The hash load_pairs gives the same files, without loading them."""
    digest = hashlib.sha256()
    for f in find_pair_files(url):
        try:
            digest.update(hashlib.sha256(storage.read_bytes(f)).digest())
        except FileNotFoundError as e:
            raise TrainingError(f"pairs file {f} is listed but missing") from e
    return digest.hexdigest()


def _file_format(url: str) -> str:
    if url.endswith(".parquet"):
        return "parquet"
    if url.endswith((".jsonl", ".json")):
        return "json"
    raise TrainingError(f"pairs file {url}: unknown format (expected .jsonl, .json or .parquet)")


def _check_message_list(value: Any, roles: tuple[str, ...], last_role: str | None) -> str | None:
    """Why `value` is not a list of {role, content} messages, or None."""
    if value is None:
        return "is missing"
    if not isinstance(value, list) or not value:
        return f"is not a non-empty list of messages (got {type(value).__name__})"
    for message in value:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            return "has a message without a text 'content'"
        if message.get("role") not in roles:
            return f"has a message with role {message.get('role')!r}, expected one of {', '.join(roles)}"
    if last_role and value[-1]["role"] != last_role:
        return f"must end with a {last_role!r} message"
    return None


def _locate_row(files: list[str], index: int) -> str:
    """'file, line N' of the index-th row over the pair files, for error messages."""
    seen = 0
    for url in files:
        fmt = "parquet" if url.endswith(".parquet") else "jsonl"
        try:
            count = len(shards.decode_rows(storage.read_bytes(url), fmt, url))
        except (StorageError, OSError):
            return url
        if index < seen + count:
            return f"{url}, {'row' if fmt == 'parquet' else 'line'} {index - seen + 1}"
        seen += count
    return files[-1]


def _diagnose_load_failure(files: list[str], error: Exception) -> TrainingError:
    """Name the pair file, line and column that datasets could not read."""
    columns: dict[str, list[str]] = {}
    for url in files:
        fmt = "parquet" if url.endswith(".parquet") else "jsonl"
        try:
            rows = shards.decode_rows(storage.read_bytes(url), fmt, url)
        except StorageError as e:
            return TrainingError(f"malformed pairs: {e}")
        for line, row in enumerate(rows, 1):
            where = f"{url}, {'row' if fmt == 'parquet' else 'line'} {line}"
            if not isinstance(row, dict):
                return TrainingError(f"malformed pair in {where}: not a JSON object")
            for column, (roles, last) in _MESSAGE_RULES.items():
                problem = _check_message_list(row.get(column), roles, last) if column in row else "is missing"
                if problem:
                    return TrainingError(f"malformed pair in {where}: column {column!r} {problem}")
        columns[url] = sorted({k for r in rows for k in r})
    if len({tuple(c) for c in columns.values()}) > 1:
        detail = "; ".join(f"{u}: {', '.join(c)}" for u, c in columns.items())
        return TrainingError(f"malformed pairs: the pair files have different columns ({detail})")
    return TrainingError(f"malformed pairs {', '.join(files)}: {type(error).__name__}: {error}")


def load_pairs(url: str) -> tuple[Dataset, list[str], str]:
    """Read a pairs folder or file with datasets; check columns and rows; add ROW_COLUMN.

    Returns the dataset, its files and a sha256 over their bytes. Errors name the file, row and column.
    """
    import datasets

    files = find_pair_files(url)
    formats = {_file_format(f) for f in files}
    if len(formats) > 1:
        raise TrainingError(f"pairs {url} mixes JSON and Parquet files: {', '.join(files)}")
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory(prefix="sao-pairs-") as tmp:
        local = []
        for i, f in enumerate(files):
            try:
                data = storage.read_bytes(f)
            except FileNotFoundError as e:
                raise TrainingError(f"pairs file {f} is listed but missing") from e
            digest.update(hashlib.sha256(data).digest())
            if not data.strip():
                continue  # an empty shard holds no rows; datasets refuses it
            if _file_format(f) == "json":
                try:  # pyarrow's JSON reader takes any bytes as text; the first read of a row would fail
                    data.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise TrainingError(f"malformed pairs: {f} is not UTF-8 text: {e}") from e
            target = Path(tmp) / f"{i:05d}-{Path(f).name}"
            target.write_bytes(data)
            local.append(str(target))
        if not local:
            raise TrainingError(f"pairs {url} is empty: no rows in {', '.join(files)}")
        quiet_libraries()
        try:
            ds = datasets.load_dataset(
                formats.pop(),
                data_files=local,
                split="train",
                cache_dir=str(Path(tmp) / "cache"),
                keep_in_memory=True,
                # datasets 4 and later run no loading scripts; said explicitly, so no version's default decides.
                trust_remote_code=False,
            )
        except Exception as e:  # datasets wraps parser errors in its own types; name the file instead
            raise _diagnose_load_failure(files, e) from e
    if len(ds) == 0:
        raise TrainingError(f"pairs {url} is empty: no rows in {', '.join(files)}")
    missing = [c for c in PAIR_COLUMNS if c not in ds.column_names]
    if missing:
        raise TrainingError(
            f"pairs {url} has no column {', '.join(repr(c) for c in missing)} "
            f"(columns: {', '.join(ds.column_names)}; a pair row is TRL's conversational preference format)"
        )
    for column, (roles, last) in _MESSAGE_RULES.items():
        for i, value in enumerate(ds[column]):
            problem = _check_message_list(value, roles, last)
            if problem:
                raise TrainingError(f"malformed pair in {_locate_row(files, i)}: column {column!r} {problem}")
    if ROW_COLUMN in ds.column_names:
        ds = ds.remove_columns(ROW_COLUMN)
    ds = ds.add_column(ROW_COLUMN, list(range(len(ds))))
    return ds, files, digest.hexdigest()


def measure_lengths(ds: Dataset, tokenizer: Any, adds_bos: bool) -> tuple[list[int], list[int], list[int]]:
    """Token counts per row as TRL builds the sequences: the prompt with the generation prompt, and
    prompt+answer through the chat template, plus the EOS (and, for CPO/ORPO, the BOS) TRL adds when
    the text lacks it. Returns prompt lengths and prompt+chosen, prompt+rejected lengths."""
    bos = tokenizer.bos_token_id if adds_bos else None
    prompts = [
        tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in ds["prompt"]
    ]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    extra_bos = [1 if bos is not None and (not x or x[0] != bos) else 0 for x in prompt_ids]

    def totals(column: str) -> list[int]:
        texts = [
            tokenizer.apply_chat_template(p + a, tokenize=False)
            for p, a in zip(ds["prompt"], ds[column], strict=True)
        ]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        eos = tokenizer.eos_token_id
        return [len(x) + (0 if x and x[-1] == eos else 1) + b for x, b in zip(ids, extra_bos, strict=True)]

    return (
        [len(x) + b for x, b in zip(prompt_ids, extra_bos, strict=True)],
        totals("chosen"),
        totals("rejected"),
    )


def prepare_pairs(
    url: str, tokenizer: Any, tcfg: TrainingConfig, loaded: tuple[Dataset, list[str], str] | None = None
) -> Pairs:
    """Load and check the pairs (or take what load_pairs gave), then drop (and count) rows longer than
    max_length / max_prompt_length, and rows whose prompt_id an earlier row has (a pairs file written
    twice over, or by hand).

    SimPO's code truncates long answers instead; we drop them, because a truncated answer changes the
    length-normalised reward the pair is trained on. No row left is an error naming the rows and why.
    """
    ds, files, sha = loaded or load_pairs(url)
    prompt_ids = (
        [str(x) for x in ds["prompt_id"]]
        if "prompt_id" in ds.column_names
        else [str(i) for i in range(len(ds))]
    )
    # CPOTrainer and ORPOTrainer prepend the BOS when the templated prompt lacks it; DPOTrainer does not.
    prompt_len, chosen_len, rejected_len = measure_lengths(ds, tokenizer, adds_bos=tcfg.objective != "dpo")
    keep, drops = [], {"duplicate_prompt_id": 0, "prompt_too_long": 0, "too_long": 0}
    seen: set[str] = set()
    for i, (p, c, r) in enumerate(zip(prompt_len, chosen_len, rejected_len, strict=True)):
        if prompt_ids[i] in seen:
            drops["duplicate_prompt_id"] += 1  # one prompt, one pair: a repeat would weigh it twice
            continue
        seen.add(prompt_ids[i])
        if p > tcfg.max_prompt_length:
            drops["prompt_too_long"] += 1
        elif max(c, r) > tcfg.max_length:
            drops["too_long"] += 1
        else:
            keep.append(i)
    if not keep:
        raise TrainingError(
            f"every one of the {len(ds)} pairs in {url} is longer than training.max_length={tcfg.max_length} "
            f"or its prompt longer than training.max_prompt_length={tcfg.max_prompt_length} tokens "
            f"(shortest pair {min(max(c, r) for c, r in zip(chosen_len, rejected_len, strict=True))} tokens, "
            f"shortest prompt {min(prompt_len)}): "
            + _too_long_rows(files, prompt_ids, prompt_len, chosen_len, rejected_len, tcfg)
        )
    tokens = [c + r for c, r in zip(chosen_len, rejected_len, strict=True)]
    rows_in = len(ds)
    if len(keep) < rows_in:
        ds = ds.select(keep)
    ds = ds.select_columns([*PAIR_COLUMNS, ROW_COLUMN])
    drops = {k: v for k, v in drops.items() if v}
    return Pairs(ds, files, sha, rows_in, prompt_ids, tokens, drops, tokenizer)


def _too_long_rows(
    files: list[str],
    prompt_ids: list[str],
    prompt_len: list[int],
    chosen_len: list[int],
    rejected_len: list[int],
    tcfg: TrainingConfig,
    shown: int = 3,
) -> str:
    """Which rows are too long and why, the first `shown` of them, for the error that no row is left."""
    why: list[str] = []
    for i, (p, c, r) in enumerate(zip(prompt_len, chosen_len, rejected_len, strict=True)):
        if len(why) == shown:
            why.append(f"and {len(prompt_len) - shown} more")
            break
        if p > tcfg.max_prompt_length:
            reason = f"prompt {p} tokens > training.max_prompt_length {tcfg.max_prompt_length}"
        elif max(c, r) > tcfg.max_length:
            reason = f"prompt+answer {max(c, r)} tokens > training.max_length {tcfg.max_length}"
        else:
            reason = "a repeat of an earlier prompt_id"
        why.append(f"{_locate_row(files, i)} (prompt_id {prompt_ids[i]}): {reason}")
    return "; ".join(why) + "; raise the limits or shorten the pairs"


def repeated_rows(rows: int, per_device_batch_size: int, world_size: int, epochs: float = 1.0) -> int:
    """Rows trained twice over `epochs` because `rows` pairs do not fill whole batches on every process.

    Under several processes, accelerate (the Trainer's default `even_batches=True`) gives every process
    the same number of full batches per epoch and fills the last ones with rows from the start of the
    epoch: per_device_batch_size x world_size x ceil(rows / (per_device_batch_size x world_size)) rows
    are trained each epoch. The fill ends an epoch, so only epochs run to their end count. One process
    trains a short last batch instead and repeats nothing.
    """
    if world_size <= 1:
        return 0
    per_round = per_device_batch_size * world_size
    return (-rows % per_round) * math.floor(epochs + 1e-9)
