"""Preference training (SAO.md step 6): SimPO by default, DPO or ORPO, over TRL with LoRA or full weights.

    sao train --config configs/cpu-smollm2.yaml --pairs artifacts/smollm2-cpu/round_001-.../pairs
    python -m sao_core.stages.train --config CFG --pairs URL --output URL    # one rank (torchrun, accelerate)

`train` validates everything it can before any process starts (objective, model path, pairs, lengths),
then trains in this process (`training.launcher: inprocess`) or under `accelerate launch` / `torchrun`
with `training.num_processes` ranks, streaming their output. Each rank runs `run_training`.

TRL implements all three objectives in 1.16: SimPO as CPOTrainer(loss_type="simpo", cpo_alpha=0) in
trl.experimental.cpo, ORPO in trl.experimental.orpo, DPO in trl. Every TRL setting we rely on is set in
`build_trl_config`: TRL's defaults move between releases (bf16, gradient checkpointing, lr, logging).

The output folder ({round}/model/{training hash}/ by default, any fsspec URL) holds:

    adapter/            LoRA adapter (PEFT save_pretrained) and tokenizer
    full/               full model: full fine-tune, or the merged LoRA when training.merge
    checkpoints/        checkpoint-N every training.checkpoint_steps; a rerun resumes from the last one
    train_log.json      per-step loss, rewards/margins, rewards/accuracies, lr, ...
    train_curves.png    the curves of train_log.json
    ranks.json          rows each rank trained on, and a hash of its final trainable weights
    run.json            what is being trained (settings hash, pairs hash, model): a rerun must match it
    manifest.json       written last: the run is finished and is not redone

A remote output (s3://...) trains into a local staging folder and uploads every checkpoint and the final
files; a restarted run downloads the last uploaded checkpoint first.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sao_core import storage
from sao_core.config import RoundConfig, TrainingConfig, config_to_yaml, hash_config, load_config, round_url
from sao_core.errors import ConfigError, ModelNotFoundError, SAOError, StorageError, TrainingError
from sao_core.models import model_revision, resolve_model

if TYPE_CHECKING:
    from datasets import Dataset

OBJECTIVES = ("simpo", "dpo", "orpo")
PAIR_COLUMNS = ("prompt", "chosen", "rejected")
ROW_COLUMN = "sao_row"  # our row index, carried through TRL's collator to see which rows each rank trains on
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ACCELERATE_CONFIG = "deployments/accelerate/ddp.yaml"
LOG_PREFIX = "[sao-train]"
# Settings that change how a run is launched or kept, not what it learns: a resumed run may change them.
_LAUNCH_KEYS = (
    "launcher",
    "num_processes",
    "accelerate_config",
    "checkpoint_steps",
    "save_total_limit",
    "keep_checkpoints",
    "logging_steps",
)


def _say(message: str) -> None:
    print(f"{LOG_PREFIX} {message}", flush=True)


# --- settings --------------------------------------------------------------------------------------------


def gradient_accumulation_steps(tcfg: TrainingConfig, world_size: int) -> int:
    """Accumulation that makes per-device batch x accumulation x processes equal the global batch."""
    per_step = tcfg.per_device_batch_size * world_size
    if tcfg.global_batch_size % per_step:
        raise ConfigError(
            f"training.global_batch_size ({tcfg.global_batch_size}) is not a multiple of "
            f"per_device_batch_size x processes ({tcfg.per_device_batch_size} x {world_size} = {per_step})"
        )
    return tcfg.global_batch_size // per_step


def params_hash(cfg: RoundConfig) -> str:
    """What the run learns: the training settings (less how it is launched) and the starting model."""
    training = cfg.training.model_dump(mode="json")
    for key in _LAUNCH_KEYS:
        training.pop(key, None)
    canonical = json.dumps({"training": training, "model": cfg.model.model_dump(mode="json")}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def _deploy_path(path: str, key: str) -> str:
    """A deployments/ file named relative to the working folder or to the repository."""
    for candidate in (Path(path).expanduser(), REPO_ROOT / path):
        if candidate.is_file():
            return str(candidate.resolve())
    raise ConfigError(
        f"{key}: file {path!r} not found (relative paths are tried from here and from {REPO_ROOT})"
    )


def _check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ConfigError(f"training.objective {objective!r} is unknown; allowed: {', '.join(OBJECTIVES)}")


def build_peft_config(tcfg: TrainingConfig) -> Any:
    """PEFT LoraConfig from training.lora, or None for a full fine-tune."""
    if not tcfg.lora.enabled:
        return None
    from peft import LoraConfig

    targets = tcfg.lora.target_modules
    return LoraConfig(
        r=tcfg.lora.r,
        lora_alpha=tcfg.lora.alpha,
        lora_dropout=tcfg.lora.dropout,
        target_modules="all-linear" if targets == ("all-linear",) else list(targets),
        bias="none",
        task_type="CAUSAL_LM",
    )


def build_trl_config(tcfg: TrainingConfig, output_dir: str, world_size: int, use_cpu: bool) -> Any:
    """TRL's config for the objective, with every setting we rely on set explicitly."""
    _check_objective(tcfg.objective)
    if use_cpu and tcfg.precision == "fp16":
        raise ConfigError("training.precision 'fp16' needs a GPU; use 'bf16' or 'fp32' on CPU")
    deepspeed = _deploy_path(tcfg.deepspeed, "training.deepspeed") if tcfg.deepspeed else None
    _quiet_libraries()
    common: dict[str, Any] = dict(
        output_dir=output_dir,
        seed=tcfg.seed,
        data_seed=tcfg.seed,
        learning_rate=tcfg.learning_rate,
        lr_scheduler_type=tcfg.lr_scheduler,
        # transformers 5 reads a warmup_steps below 1 as a ratio of the total steps (warmup_ratio is gone).
        warmup_steps=tcfg.warmup_ratio,
        num_train_epochs=tcfg.epochs,
        max_steps=tcfg.max_steps,
        per_device_train_batch_size=tcfg.per_device_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps(tcfg, world_size),
        optim="adamw_torch",
        weight_decay=tcfg.weight_decay,
        max_grad_norm=tcfg.max_grad_norm,
        bf16=tcfg.precision == "bf16",
        fp16=tcfg.precision == "fp16",
        # transformers 5 renamed gradient checkpointing; TRL's own default for the old name is True.
        activation_checkpointing=tcfg.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if tcfg.gradient_checkpointing else None,
        max_length=tcfg.max_length,
        disable_dropout=True,
        logging_strategy="steps",
        logging_steps=tcfg.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=tcfg.checkpoint_steps,
        save_total_limit=tcfg.save_total_limit,
        save_only_model=False,  # optimizer, scheduler and RNG states are what make a resume exact
        report_to="none",
        disable_tqdm=True,
        log_level="warning",
        log_level_replica="error",
        dataloader_num_workers=0,
        dataloader_drop_last=False,
        use_cpu=use_cpu,
        ddp_backend="gloo" if use_cpu and world_size > 1 else None,
        ddp_find_unused_parameters=False,
        deepspeed=deepspeed,
        dataset_num_proc=None,
        model_init_kwargs=None,
    )
    if tcfg.objective == "dpo":
        from trl import DPOConfig

        return DPOConfig(
            **common,
            beta=tcfg.dpo_beta,
            loss_type=["sigmoid"],
            label_smoothing=0.0,
            truncation_mode="keep_start",
            padding_free=False,
            pad_to_multiple_of=None,
            precompute_ref_log_probs=False,
            use_weighting=False,
            ld_alpha=None,
            f_divergence_type="reverse_kl",
            sync_ref_model=False,
            remove_unused_columns=True,  # our row column is added to the kept ones (trainer_class)
        )
    if tcfg.objective == "simpo":
        from trl.experimental.cpo import CPOConfig

        return CPOConfig(
            **common,
            loss_type="simpo",
            beta=tcfg.beta,
            simpo_gamma=tcfg.simpo_gamma,
            cpo_alpha=0.0,  # no behaviour-cloning term: plain SimPO (SAO.md)
            alpha=0.0,  # no AlphaPO reward shaping
            label_smoothing=0.0,
            max_completion_length=None,
            generate_during_eval=False,
            remove_unused_columns=False,  # CPOTrainer's collator needs the raw columns
        )
    from trl.experimental.orpo import ORPOConfig

    return ORPOConfig(
        **common,
        beta=tcfg.orpo_beta,
        padding_value=None,  # the tokenizer's pad token
        max_completion_length=None,
        generate_during_eval=False,
        remove_unused_columns=False,
    )


# --- pairs -----------------------------------------------------------------------------------------------


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
            manifest = storage.read_stage_manifest(url)
        except StorageError as e:
            raise TrainingError(f"pairs {url}: {e}") from e
        files = [storage.join(url, entry["file"]) for entry in manifest["shards"]]
    else:
        files = storage.list_files(url, "part-*.jsonl") or storage.list_files(url, "*.parquet")
        files = files or storage.list_files(url, "*.jsonl")
    if not files:
        raise TrainingError(f"pairs {url} holds no pair files (part-*.jsonl, *.parquet or a manifest.json)")
    return files


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
            count = len(storage.decode_rows(storage.read_bytes(url), fmt, url))
        except (StorageError, OSError):
            return url
        if index < seen + count:
            return f"{url}, {'row' if fmt == 'parquet' else 'line'} {index - seen + 1}"
        seen += count
    return files[-1]


_MESSAGE_RULES = {
    "prompt": (("system", "user", "assistant", "tool"), "user"),
    "chosen": (("assistant",), None),
    "rejected": (("assistant",), None),
}


def _diagnose_load_failure(files: list[str], error: Exception) -> TrainingError:
    """Name the pair file, line and column that datasets could not read."""
    columns: dict[str, list[str]] = {}
    for url in files:
        fmt = "parquet" if url.endswith(".parquet") else "jsonl"
        try:
            rows = storage.decode_rows(storage.read_bytes(url), fmt, url)
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
            target = Path(tmp) / f"{i:05d}-{Path(f).name}"
            target.write_bytes(data)
            local.append(str(target))
        if not local:
            raise TrainingError(f"pairs {url} is empty: no rows in {', '.join(files)}")
        _quiet_libraries()
        try:
            ds = datasets.load_dataset(
                formats.pop(),
                data_files=local,
                split="train",
                cache_dir=str(Path(tmp) / "cache"),
                keep_in_memory=True,
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


def prepare_pairs(url: str, tokenizer: Any, tcfg: TrainingConfig) -> Pairs:
    """Load and check the pairs, then drop (and count) rows longer than max_length / max_prompt_length.

    SimPO's code truncates long answers instead; we drop them, because a truncated answer changes the
    length-normalised reward the pair is trained on. No row left is an error.
    """
    ds, files, sha = load_pairs(url)
    # CPOTrainer and ORPOTrainer prepend the BOS when the templated prompt lacks it; DPOTrainer does not.
    prompt_len, chosen_len, rejected_len = measure_lengths(ds, tokenizer, adds_bos=tcfg.objective != "dpo")
    keep, drops = [], {"prompt_too_long": 0, "too_long": 0}
    for i, (p, c, r) in enumerate(zip(prompt_len, chosen_len, rejected_len, strict=True)):
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
            f"shortest prompt {min(prompt_len)})"
        )
    prompt_ids = (
        [str(x) for x in ds["prompt_id"]]
        if "prompt_id" in ds.column_names
        else [str(i) for i in range(len(ds))]
    )
    tokens = [c + r for c, r in zip(chosen_len, rejected_len, strict=True)]
    rows_in = len(ds)
    if len(keep) < rows_in:
        ds = ds.select(keep)
    ds = ds.select_columns([*PAIR_COLUMNS, ROW_COLUMN])
    return Pairs(ds, files, sha, rows_in, prompt_ids, tokens, {k: v for k, v in drops.items() if v})


# --- trainer ---------------------------------------------------------------------------------------------


class _RowTaggingCollator:
    """Wraps TRL's collator: takes our row index out of each example and puts the list in the batch."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        rows = [int(f.pop(ROW_COLUMN)) for f in features]
        batch = self.inner(features)
        batch[ROW_COLUMN] = rows
        return batch


def _quiet_libraries() -> None:
    # trl.experimental is where TRL 1.16 keeps CPO (SimPO) and ORPO: we import it on purpose.
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def trainer_class(objective: str) -> type:
    """TRL's trainer for the objective, which also records the rows each step trains on."""
    _check_objective(objective)
    _quiet_libraries()
    base: type
    if objective == "dpo":
        from trl import DPOTrainer

        base = DPOTrainer
    elif objective == "simpo":
        from trl.experimental.cpo import CPOTrainer

        base = CPOTrainer
    else:
        from trl.experimental.orpo import ORPOTrainer

        base = ORPOTrainer

    class SAOTrainer(base):
        rows_seen: list[int]

        def _set_signature_columns_if_needed(self) -> None:
            super()._set_signature_columns_if_needed()
            columns: list[str] | None = getattr(self, "_signature_columns", None)
            if columns is not None and ROW_COLUMN not in columns:
                self._signature_columns = [*columns, ROW_COLUMN]

        def compute_loss(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            rows = inputs.pop(ROW_COLUMN, None)
            if rows is not None and model.training:
                self.rows_seen.extend(rows)
            return super().compute_loss(model, inputs, *args, **kwargs)

    SAOTrainer.__name__ = SAOTrainer.__qualname__ = f"SAO{base.__name__}"
    return SAOTrainer


def _progress_callback(total_hint: int) -> Any:
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """One line per logged step on the main process: what the launcher streams."""

        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
        ) -> None:
            if not state.is_world_process_zero or not logs or "loss" not in logs:
                return
            parts = [f"step {state.global_step}/{state.max_steps or total_hint}", f"loss {logs['loss']:.4f}"]
            for key, label in (("rewards/margins", "margin"), ("rewards/accuracies", "acc")):
                if key in logs:
                    parts.append(f"{label} {logs[key]:.4f}")
            if "learning_rate" in logs:
                parts.append(f"lr {logs['learning_rate']:.2e}")
            _say(" ".join(parts))

    return Progress()


def _checkpoint_sync_callback(output_url: str, staging: str) -> Any:
    from transformers import TrainerCallback

    class CheckpointSync(TrainerCallback):
        """Uploads each checkpoint to a remote output (trainer_state.json last: it marks completion)."""

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.barrier()  # every rank has written its part of the checkpoint
            if state.is_world_process_zero:
                name = f"checkpoint-{state.global_step}"
                _upload_folder(
                    Path(staging) / "checkpoints" / name, storage.join(output_url, "checkpoints", name)
                )
                _prune_remote_checkpoints(output_url, Path(staging) / "checkpoints")

    return CheckpointSync()


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise TrainingError(f"model {path} has no loadable tokenizer: {e}") from e
    if not tokenizer.chat_template:
        raise TrainingError(f"model {path} has no chat template: pairs are chats and need one")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_adapter(url: str) -> None:
    """model.adapter must be a LoRA adapter folder (by URL): checked before anything loads."""
    if not storage.exists(storage.join(url, "adapter_config.json")):
        raise ModelNotFoundError(f"model.adapter {url} is not a LoRA adapter folder (no adapter_config.json)")


def local_adapter(url: str, download_to: Path) -> str:
    """A local folder holding the LoRA adapter at `url` (model.adapter: the policy a round starts from)."""
    check_adapter(url)
    if storage.is_local(url):
        return storage.url_to_fs(url)[1]
    shutil.rmtree(download_to, ignore_errors=True)
    for f in _walk(url):
        dest = download_to / f[len(url.rstrip("/")) + 1 :]
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(storage.read_bytes(f))
    return str(download_to)


def load_model(path: str, adapter: str | None = None, dtype: Any = None) -> Any:
    """The model to train, weights in fp32 unless `dtype` (see TrainingConfig.precision). With an
    adapter (a local folder), the adapter is merged in: training starts from that policy, and it is
    DPO's reference too (SAO.md step 7: round t+1 starts from M_t+1)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model


@dataclass
class TrainingSetup:
    """A built trainer and what went into it (see prepare_training)."""

    trainer: Any
    pairs: Pairs
    model_path: str
    world_size: int
    start_adapter: str | None = None  # local copy of model.adapter, merged into the model


def prepare_training(
    cfg: RoundConfig, pairs_url: str, staging: str, pairs: Pairs | None = None
) -> TrainingSetup:
    """Check the inputs (unless already checked: `pairs`), then build the TRL trainer; it trains nothing yet."""
    import torch

    tcfg = cfg.training
    _check_objective(tcfg.objective)
    model_path = resolve_model(cfg.model.path)
    rank = os.environ.get("RANK", "0")
    adapter = (
        local_adapter(cfg.model.adapter, Path(staging) / f"start-adapter-{rank}")
        if cfg.model.adapter
        else None
    )
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    tokenizer = load_tokenizer(model_path)
    if pairs is None:
        pairs = prepare_pairs(pairs_url, tokenizer, tcfg)
    # TrainingArguments set up the process group (and DeepSpeed's zero.Init) before the model loads.
    args = build_trl_config(
        tcfg, str(Path(staging) / "checkpoints"), world_size, not torch.cuda.is_available()
    )
    cls = trainer_class(tcfg.objective)
    trainer = cls(
        model=load_model(model_path, adapter),
        args=args,
        train_dataset=pairs.dataset,
        processing_class=tokenizer,
        peft_config=build_peft_config(tcfg),
    )
    trainer.rows_seen = []
    trainer.data_collator = _RowTaggingCollator(trainer.data_collator)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(_progress_callback(max(tcfg.max_steps, 0)))
    return TrainingSetup(trainer, pairs, model_path, world_size, adapter)


# --- checkpoints and outputs ---------------------------------------------------------------------------


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


def _walk(url: str) -> list[str]:
    fs, path = storage.url_to_fs(url)
    if not fs.exists(path):
        return []
    prefix = url.rstrip("/")
    base = path.rstrip("/")
    return sorted(prefix + p[len(base) :] for p in fs.find(path) if p.startswith(base))


def _upload_folder(local: Path, url: str) -> None:
    files = sorted(p for p in local.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name == "trainer_state.json")  # the completion mark goes last
    for p in files:
        storage.write_bytes(storage.join(url, p.relative_to(local).as_posix()), p.read_bytes())


def _prune_remote_checkpoints(output_url: str, local_checkpoints: Path) -> None:
    keep = {p.name for p in local_checkpoints.iterdir()} if local_checkpoints.is_dir() else set()
    for url in storage.list_files(storage.join(output_url, "checkpoints"), "checkpoint-*"):
        if url.rstrip("/").rsplit("/", 1)[-1] not in keep:
            storage.remove(url, recursive=True)


def _download_last_checkpoint(output_url: str, staging: Path) -> None:
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
    for file_url in _walk(url):
        dest = target / file_url[len(url.rstrip("/")) + 1 :]
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(storage.read_bytes(file_url))


def _staging_dir(output_url: str) -> Path:
    if storage.is_local(output_url):
        return Path(storage.url_to_fs(output_url)[1])
    from sao_core.models import cache_dir

    key = hashlib.sha256(output_url.rstrip("/").encode()).hexdigest()[:16]
    return cache_dir() / "train-staging" / key


def read_train_log(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-step training entries of a trainer's log history (numbers only)."""
    steps = []
    for entry in log_history:
        if "loss" not in entry or "train_runtime" in entry:
            continue
        steps.append(
            {k: v for k, v in entry.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        )
    return steps


def plot_curves(steps: list[dict[str, Any]], title: str) -> bytes:
    """PNG of loss, reward margin, reward accuracy and learning rate per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("loss", "loss"),
        ("rewards/margins", "reward margin"),
        ("rewards/accuracies", "reward accuracy"),
        ("learning_rate", "learning rate"),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    for ax, (key, label) in zip(axes.flat, panels, strict=True):
        points = [(s["step"], s[key]) for s in steps if key in s]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _trainable_sha256(model: Any) -> str:
    h = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if param.requires_grad:
            h.update(name.encode())
            h.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _merge_adapter(setup: TrainingSetup, adapter_dir: Path, out_dir: Path, tcfg: TrainingConfig) -> None:
    """Starting model + trained adapter, merged and saved as a plain model (loaded afresh from disk, so
    it works after ZeRO-3 too)."""
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tcfg.precision, torch.float32)
    base = load_model(setup.model_path, setup.start_adapter, dtype=dtype)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(out_dir)


# --- runs ------------------------------------------------------------------------------------------------


def _finished(output_url: str, identity: dict[str, str]) -> dict[str, Any] | None:
    """The manifest of a finished run with the same identity; an error for a different one."""
    url = storage.join(output_url, "manifest.json")
    if not storage.exists(url):
        return None
    manifest = storage.read_json(url)
    if not isinstance(manifest, dict) or not manifest.get("complete"):
        return None
    theirs = {k: manifest.get(k) for k in identity}
    if theirs != identity:
        raise TrainingError(
            f"{output_url} already holds a model trained from other settings or pairs ({theirs} != {identity}); "
            "give another output URL or remove it"
        )
    return manifest


def _check_run_identity(output_url: str, identity: dict[str, str], write: bool) -> None:
    """Refuse to resume checkpoints made from other settings or pairs; record ours for later runs."""
    url = storage.join(output_url, "run.json")
    if storage.exists(url):
        theirs = storage.read_json(url)
        if {k: theirs.get(k) for k in identity} != identity:
            raise TrainingError(
                f"{output_url} holds checkpoints of another run ({url}: {theirs} != {identity}); "
                "give another output URL or remove that folder"
            )
    elif write:
        storage.write_json(url, identity)


def _identity(cfg: RoundConfig, pairs_sha256: str) -> dict[str, str]:
    return {"params_hash": params_hash(cfg), "pairs_sha256": pairs_sha256, "model": cfg.model.path}


def _pairs_sha256(url: str) -> str:
    digest = hashlib.sha256()
    for f in find_pair_files(url):
        try:
            digest.update(hashlib.sha256(storage.read_bytes(f)).digest())
        except FileNotFoundError as e:
            raise TrainingError(f"pairs file {f} is listed but missing") from e
    return digest.hexdigest()


def run_training(
    cfg: RoundConfig, pairs_url: str, output_url: str, pairs: Pairs | None = None
) -> dict[str, Any]:
    """Train this rank (the whole run when there is one process); return the run's manifest.

    Resumes from the last complete checkpoint in the output; a finished run with the same settings and
    pairs returns its manifest without training.
    """
    tcfg = cfg.training
    output_url = output_url.rstrip("/")
    identity = _identity(cfg, pairs.sha256 if pairs is not None else _pairs_sha256(pairs_url))
    done = _finished(output_url, identity)
    if done is not None:
        _say(f"{output_url} is already trained ({done.get('steps')} steps): nothing to do")
        return done
    _check_run_identity(output_url, identity, write=False)
    staging = _staging_dir(output_url)
    remote = not storage.is_local(output_url)
    setup = prepare_training(cfg, pairs_url, str(staging), pairs)
    trainer, pairs = setup.trainer, setup.pairs
    is_main = trainer.args.process_index == 0
    if is_main:
        _check_run_identity(output_url, identity, write=True)
        if remote:
            _download_last_checkpoint(output_url, staging)
            trainer.add_callback(_checkpoint_sync_callback(output_url, str(staging)))
    elif remote:
        trainer.add_callback(_checkpoint_sync_callback(output_url, str(staging)))
    trainer.accelerator.wait_for_everyone()
    resume = last_checkpoint(staging / "checkpoints")
    if is_main:
        dropped = sum(pairs.drops.values())
        _say(
            f"{tcfg.objective} on {len(pairs.dataset)} pairs ({dropped} dropped as too long), "
            f"{setup.world_size} process(es), global batch {tcfg.global_batch_size} = "
            f"{tcfg.per_device_batch_size} x {trainer.args.gradient_accumulation_steps} x {setup.world_size}, "
            f"{'LoRA' if tcfg.lora.enabled else 'full fine-tune'}, {tcfg.precision}"
        )
        if resume is not None:
            _say(f"resuming from {resume.name} (step {resume.name[11:]})")

    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.perf_counter() - started

    from accelerate.utils import gather_object

    rank_info = {
        "rank": trainer.args.process_index,
        "rows": [pairs.prompt_ids[r] for r in trainer.rows_seen],
        "tokens": sum(pairs.tokens[r] for r in trainer.rows_seen),
        "trainable_sha256": _trainable_sha256(trainer.accelerator.unwrap_model(trainer.model)),
    }
    ranks = gather_object([rank_info]) if setup.world_size > 1 else [rank_info]
    model_dir = staging / ("adapter" if tcfg.lora.enabled else "full")
    trainer.save_model(str(model_dir))  # every rank: ZeRO-3 gathers the shards here
    manifest: dict[str, Any] = {}
    if is_main:
        if tcfg.lora.enabled and tcfg.merge:
            _merge_adapter(setup, model_dir, staging / "full", tcfg)
        tokens = sum(r["tokens"] for r in ranks)
        steps = read_train_log(trainer.state.log_history)
        manifest = {
            "stage": "train",
            "complete": True,
            **identity,
            "config_hash": hash_config(tcfg),
            "objective": tcfg.objective,
            "model_revision": model_revision(cfg.model.path, setup.model_path, cfg.model.revision),
            "adapter": "adapter" if tcfg.lora.enabled else None,
            "full_model": "full" if (not tcfg.lora.enabled or tcfg.merge) else None,
            "steps": trainer.state.global_step,
            "epochs": trainer.state.epoch,
            "resumed_from": resume.name if resume else None,
            "rows_in": pairs.rows_in,
            "rows": len(pairs.dataset),
            "drops": pairs.drops,
            "world_size": setup.world_size,
            "global_batch_size": tcfg.global_batch_size,
            "gradient_accumulation_steps": trainer.args.gradient_accumulation_steps,
            "seconds": round(seconds, 3),
            "tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 2) if seconds > 0 else None,
            "final_loss": steps[-1]["loss"] if steps else None,
            "ranks": [
                {
                    "rank": r["rank"],
                    "rows": len(r["rows"]),
                    "tokens": r["tokens"],
                    "trainable_sha256": r["trainable_sha256"],
                }
                for r in ranks
            ],
            "pairs_files": pairs.files,
            "device": _device_name(trainer.args.use_cpu),
            "backend": _backend(),
            "versions": _versions(),
        }
        _write_outputs(output_url, staging, remote, manifest, steps, ranks, tcfg)
        if not tcfg.keep_checkpoints:
            shutil.rmtree(staging / "checkpoints", ignore_errors=True)
            if remote:
                storage.remove(storage.join(output_url, "checkpoints"), recursive=True)
        _say(
            f"done: {manifest['steps']} steps in {seconds:.1f} s, {tokens} tokens "
            f"({manifest['tokens_per_s']} tokens/s), final loss {manifest['final_loss']}; wrote {output_url}"
        )
    if setup.start_adapter and setup.start_adapter.startswith(str(staging)):
        shutil.rmtree(setup.start_adapter, ignore_errors=True)  # our download of a remote model.adapter
    trainer.accelerator.wait_for_everyone()
    return manifest or {"rank": trainer.args.process_index, "complete": True}


def _device_name(use_cpu: bool) -> str:
    import torch

    return "cpu" if use_cpu else str(torch.cuda.get_device_name(0))


def _backend() -> str | None:
    import torch.distributed as dist

    return str(dist.get_backend()) if dist.is_available() and dist.is_initialized() else None


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    return {p: md.version(p) for p in ("torch", "transformers", "trl", "peft", "accelerate", "datasets")}


def _write_outputs(
    output_url: str,
    staging: Path,
    remote: bool,
    manifest: dict[str, Any],
    steps: list[dict[str, Any]],
    ranks: list[dict[str, Any]],
    tcfg: TrainingConfig,
) -> None:
    if remote:
        for name in ("adapter", "full"):
            if (staging / name).is_dir():
                _upload_folder(staging / name, storage.join(output_url, name))
    storage.write_json(
        storage.join(output_url, "train_log.json"),
        {"objective": tcfg.objective, "config_hash": manifest["config_hash"], "steps": steps},
    )
    title = f"{tcfg.objective} ({'LoRA' if tcfg.lora.enabled else 'full'}), {manifest['rows']} pairs"
    storage.write_bytes(storage.join(output_url, "train_curves.png"), plot_curves(steps, title))
    storage.write_json(storage.join(output_url, "ranks.json"), ranks)
    storage.write_json(storage.join(output_url, "manifest.json"), manifest)  # last: marks the run finished


# --- launching -------------------------------------------------------------------------------------------


def check_inputs(cfg: RoundConfig, pairs_url: str) -> Pairs:
    """Every check that needs no training: objective, batch split, deployment files, model path, pairs."""
    tcfg = cfg.training
    _check_objective(tcfg.objective)
    gradient_accumulation_steps(tcfg, tcfg.num_processes)
    if tcfg.deepspeed:
        _deploy_path(tcfg.deepspeed, "training.deepspeed")
    if tcfg.launcher == "accelerate":
        _deploy_path(tcfg.accelerate_config or DEFAULT_ACCELERATE_CONFIG, "training.accelerate_config")
    model_path = resolve_model(cfg.model.path)
    if cfg.model.adapter:
        if tcfg.deepspeed:
            # ZeRO-3 shards the weights as they load, so the adapter cannot be merged into them there.
            raise ConfigError(
                "model.adapter with training.deepspeed is not supported: merge the adapter into a full "
                "model first (training.merge) and train from that"
            )
        check_adapter(cfg.model.adapter)
    return prepare_pairs(pairs_url, load_tokenizer(model_path), tcfg)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_launch_command(tcfg: TrainingConfig, stage_args: list[str], port: int) -> list[str]:
    """The accelerate or torchrun command that starts num_processes ranks of sao_core.stages.train."""
    n = str(tcfg.num_processes)
    if tcfg.launcher == "torchrun":
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", n]
        launcher += ["--master_addr", "127.0.0.1", "--master_port", str(port)]
    elif tcfg.launcher == "accelerate":
        config = _deploy_path(
            tcfg.accelerate_config or DEFAULT_ACCELERATE_CONFIG, "training.accelerate_config"
        )
        # accelerate's --cpu starts one process unless MPI is there (ENV.md); a DDP config launches through
        # torch.distributed.run on CPU too, and each rank picks gloo itself (build_trl_config).
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config]
        launcher += ["--num_processes", n, "--num_machines", "1", "--main_process_port", str(port)]
    else:
        raise ConfigError(f"training.launcher {tcfg.launcher!r} starts no processes")
    return [*launcher, "-m", "sao_core.stages.train", *stage_args]


def stream_command(
    cmd: list[str], env: dict[str, str], name: str, cwd: str | None = None, tail_lines: int = 40
) -> None:
    """Run a command, echoing its output line by line; on failure raise with its last lines."""
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    env = {**env, "PYTHONUNBUFFERED": "1"}  # lines in the order the ranks wrote them
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=cwd,
        text=True,
        bufsize=1,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            tail.append(line.rstrip("\n"))
        rc = proc.wait()
    except BaseException:
        os.killpg(proc.pid, signal.SIGTERM)  # the launcher and every rank it started
        proc.wait()
        raise
    if rc != 0:
        raise TrainingError(f"training failed: {name} exited with code {rc}; last lines:\n" + "\n".join(tail))


def _absolute(url: str) -> str:
    return str(Path(url).expanduser().resolve()) if "://" not in url else url


def _absolute_model_paths(cfg: RoundConfig) -> RoundConfig:
    """model.path and model.adapter as absolute paths when they are local folders."""
    update = {}
    for key in ("path", "adapter"):
        value = getattr(cfg.model, key)
        if value and "://" not in value and Path(value).expanduser().exists():
            update[key] = _absolute(value)
    return cfg.model_copy(update={"model": cfg.model.model_copy(update=update)}) if update else cfg


def launch_distributed(cfg: RoundConfig, pairs_url: str, output_url: str) -> dict[str, Any]:
    """Start num_processes ranks with accelerate or torchrun; return the manifest they wrote."""
    tcfg = cfg.training
    for url, what in ((pairs_url, "pairs"), (output_url, "output")):
        if url.startswith("memory://"):
            raise TrainingError(f"{what} {url} is in this process's memory: child processes cannot see it")
    # The launch runs from the repository, where deployments/ configs name each other by relative path.
    pairs_url, output_url = (_absolute(u) for u in (pairs_url, output_url))
    cwd = str(REPO_ROOT) if (REPO_ROOT / "deployments").is_dir() else None
    with tempfile.TemporaryDirectory(prefix="sao-train-") as tmp:
        config_path = Path(tmp) / "round_config.yaml"
        config_path.write_text(config_to_yaml(cfg))
        stage_args = ["--config", str(config_path), "--pairs", pairs_url, "--output", output_url]
        cmd = build_launch_command(tcfg, stage_args, _free_port())
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // tcfg.num_processes)))
        _say(f"launching {tcfg.num_processes} processes: {' '.join(cmd)}")
        stream_command(cmd, env, tcfg.launcher, cwd=cwd)
    manifest = storage.read_json(storage.join(output_url, "manifest.json"))
    if not isinstance(manifest, dict) or not manifest.get("complete"):
        raise TrainingError(f"training processes exited cleanly but {output_url} has no finished manifest")
    return manifest


def default_output_url(cfg: RoundConfig) -> str:
    """{round}/model/{training hash}: each training setting trains into its own folder, so retuning
    the training section never collides with (or overwrites) a model trained from the same data."""
    return storage.join(round_url(cfg), "model", hash_config(cfg.training))


def train(cfg: RoundConfig, pairs_url: str, output_url: str | None = None) -> dict[str, Any]:
    """Train on the pairs into output_url (default {round}/model), in this process or launched; the manifest."""
    output_url = (output_url or default_output_url(cfg)).rstrip("/")
    cfg = _absolute_model_paths(cfg)  # the launched ranks run from another folder
    pairs = check_inputs(cfg, pairs_url)
    done = _finished(output_url, _identity(cfg, pairs.sha256))
    if done is not None:
        _say(f"{output_url} is already trained ({done.get('steps')} steps): nothing to do")
        return done
    if cfg.training.launcher == "inprocess":
        return run_training(cfg, pairs_url, output_url, pairs)
    return launch_distributed(cfg, pairs_url, output_url)


# --- command line (wired into `sao` by sao_core.cli) ------------------------------------------------------


def add_train_parser(subparsers: Any) -> None:
    """Add `sao train` to the CLI's subparsers."""
    p = subparsers.add_parser(
        "train",
        help="train the model on preference pairs (SimPO, DPO or ORPO; LoRA or full)",
        description="Train on a pairs folder or file. training.launcher picks one process, accelerate or "
        "torchrun; a rerun resumes from the last checkpoint and a finished run is not redone.",
    )
    from sao_core.cli import add_config_args

    add_config_args(p)
    p.add_argument(
        "--pairs", required=True, help="pairs folder ({round}/pairs) or one .jsonl/.parquet file, by URL"
    )
    p.add_argument("--output", default=None, help="model folder URL (default: {round}/model/{training hash})")
    p.set_defaults(func=run_train_command)


def run_train_command(args: argparse.Namespace) -> int:
    """`sao train`: 0 when the model is written (or already was), 2 with the error on stderr otherwise
    (the exit code `sao` gives every SAOError)."""
    try:
        cfg = load_config(args.config, list(getattr(args, "overrides", None) or []))
        manifest = train(cfg, args.pairs, args.output)
    except SAOError as e:
        print(f"sao train: error: {e}", file=sys.stderr)
        return 2
    summary = {
        k: manifest.get(k)
        for k in ("objective", "steps", "seconds", "tokens_per_s", "final_loss", "adapter", "full_model")
    }
    print(json.dumps(summary))
    return 0
