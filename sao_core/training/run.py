"""One training rank: load the tokenizer and model, build the TRL trainer, train, write the outputs.

`run_training` is the whole run when there is one process; under `accelerate launch` / `torchrun` every
rank runs it (sao_core.training.rank) and rank 0 writes the outputs.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sao_core.config import RoundConfig, TrainingConfig
from sao_core.errors import ModelNotFoundError, TrainingError
from sao_core.store import storage
from sao_core.store.layout import hash_config
from sao_core.store.locks import process_gone
from sao_core.store.models import load_kwargs, model_revision, resolve_adapter, resolve_model
from sao_core.training.arguments import (
    build_peft_config,
    build_trl_config,
    check_objective,
    report_into,
    trainer_class,
)
from sao_core.training.data import ROW_COLUMN, Pairs, pairs_sha256, prepare_pairs, repeated_rows
from sao_core.training.outputs import (
    backend,
    check_run_identity,
    device_name,
    download_last_checkpoint,
    finished_manifest,
    last_checkpoint,
    prune_remote_checkpoints,
    rows_seen_at,
    run_identity,
    staging_dir,
    trainable_sha256,
    upload_folder,
    versions,
    write_outputs,
    write_rows_seen,
)
from sao_core.training.plots import read_train_log

RANK_LOG_TAG = "[sao-train]"  # starts every line we print, so a launcher's mixed output can be read
LAUNCHED_BY = "SAO_TRAIN_LAUNCHED_BY"  # the PID of the `train` process that launched the ranks
LAUNCHER_CHECK_S = 2.0


def say(message: str) -> None:
    print(f"{RANK_LOG_TAG} {message}", flush=True)


def stop_with_launcher(pid: int, every_s: float = LAUNCHER_CHECK_S) -> threading.Thread:
    """Exit this rank once the process that launched the run is gone: it held the output folder's
    claim, and a re-run takes the claim over and resumes from the last checkpoint; a rank training on
    would write the same folder beside it. Checkpoints are complete or ignored (last_checkpoint)."""

    def watch() -> None:
        while not process_gone(pid):
            time.sleep(every_s)
        say(f"the process that launched this run (pid {pid}) is gone: stopping this rank")
        os._exit(1)

    thread = threading.Thread(target=watch, name="stop-with-launcher", daemon=True)
    thread.start()
    return thread


# --- model and tokenizer -------------------------------------------------------------------------------


def load_tokenizer(path: str, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a resolved model (models.resolve_model); `revision` applies to a hub id only."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **load_kwargs(path, revision, trust_remote_code))
    except (OSError, ValueError) as e:
        raise TrainingError(f"model {path} has no loadable tokenizer: {e}") from e
    if not tokenizer.chat_template:
        raise TrainingError(f"model {path} has no chat template: pairs are chats and need one")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def local_adapter(url: str) -> str:
    """model.adapter (the policy a round starts from) as a local LoRA adapter folder, checked before
    anything loads; an adapter at a URL is copied into the model cache once, where every rank finds it."""
    try:
        return resolve_adapter(url)
    except ModelNotFoundError as e:
        raise ModelNotFoundError(f"model.adapter: {e}") from e


def load_model(
    path: str,
    adapter: str | None = None,
    dtype: Any = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> Any:
    """The model to train, weights in fp32 unless `dtype` (see TrainingConfig.precision); `revision`
    applies to a hub id only. With an adapter (a local folder), the adapter is merged in: training
    starts from that policy, and it is DPO's reference too (SAO.md step 7: round t+1 starts from M_t+1)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype or torch.float32, **load_kwargs(path, revision, trust_remote_code)
    )
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model


# --- the trainer ---------------------------------------------------------------------------------------


class _RowTaggingCollator:
    """Wraps TRL's collator: takes our row index out of each example and puts the list in the batch."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        rows = [int(f.pop(ROW_COLUMN)) for f in features]
        batch = self.inner(features)
        batch[ROW_COLUMN] = rows
        return batch


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
            say(" ".join(parts))

    return Progress()


def _rows_seen_callback(trainer: Any) -> Any:
    from transformers import TrainerCallback

    class RowsSeen(TrainerCallback):
        """Writes the rows every rank trained on into each checkpoint, before it is uploaded: a run resumed
        from it counts the rows of the steps before the resume too (tokens, rows per rank, ranks.json)."""

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            rows = [int(r) for r in trainer.rows_seen]
            if args.world_size > 1:
                from accelerate.utils import gather_object

                ranks = gather_object([rows])
            else:
                ranks = [rows]
            if state.is_world_process_zero:
                checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                write_rows_seen(checkpoint, state.global_step, ranks)

    return RowsSeen()


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
                upload_folder(
                    Path(staging) / "checkpoints" / name, storage.join(output_url, "checkpoints", name)
                )
                prune_remote_checkpoints(output_url, Path(staging) / "checkpoints")

    return CheckpointSync()


@dataclass
class TrainingSetup:
    """A built trainer and what went into it (see prepare_training)."""

    trainer: Any
    pairs: Pairs
    model_path: str
    world_size: int
    start_adapter: str | None = None  # local folder of model.adapter, merged into the model
    revision: str | None = None  # model.revision: the hub revision of model_path
    trust_remote_code: bool = False  # model.trust_remote_code


def prepare_training(
    cfg: RoundConfig, pairs_url: str, staging: str, pairs: Pairs | None = None
) -> TrainingSetup:
    """Check the inputs (unless already checked: `pairs`), then build the TRL trainer; it trains nothing yet."""
    import torch

    tcfg = cfg.training
    check_objective(tcfg.objective)
    model_path = resolve_model(cfg.model.path)
    revision = cfg.model.revision
    adapter = local_adapter(cfg.model.adapter) if cfg.model.adapter else None
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if pairs is not None and pairs.tokenizer is not None:
        tokenizer = pairs.tokenizer  # loaded from the same model path when the pairs were checked
    else:
        tokenizer = load_tokenizer(model_path, revision, cfg.model.trust_remote_code)
    if pairs is None:
        pairs = prepare_pairs(pairs_url, tokenizer, tcfg)
    # TrainingArguments set up the process group (and DeepSpeed's zero.Init) before the model loads.
    args = build_trl_config(
        tcfg, str(Path(staging) / "checkpoints"), world_size, not torch.cuda.is_available()
    )
    cls = trainer_class(tcfg.objective)
    trainer = cls(
        model=load_model(
            model_path, adapter, revision=revision, trust_remote_code=cfg.model.trust_remote_code
        ),
        args=args,
        train_dataset=pairs.dataset,
        processing_class=tokenizer,
        peft_config=build_peft_config(tcfg),
    )
    report_into(trainer, str(Path(staging) / "logs"))
    trainer.rows_seen = []
    trainer.data_collator = _RowTaggingCollator(trainer.data_collator)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(_progress_callback(max(tcfg.max_steps, 0)))
    trainer.add_callback(_rows_seen_callback(trainer))  # before CheckpointSync, which uploads the checkpoint
    return TrainingSetup(
        trainer, pairs, model_path, world_size, adapter, revision, cfg.model.trust_remote_code
    )


def _merge_adapter(setup: TrainingSetup, adapter_dir: Path, out_dir: Path, tcfg: TrainingConfig) -> None:
    """Starting model + trained adapter, merged and saved as a plain model (loaded afresh from disk, so
    it works after ZeRO-3 too)."""
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tcfg.precision, torch.float32)
    base = load_model(
        setup.model_path,
        setup.start_adapter,
        dtype=dtype,
        revision=setup.revision,
        trust_remote_code=setup.trust_remote_code,
    )
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(out_dir)
    # The tokenizer training saved next to the adapter: files, no code.
    AutoTokenizer.from_pretrained(adapter_dir, trust_remote_code=False).save_pretrained(out_dir)


# --- the run -------------------------------------------------------------------------------------------


def run_training(
    cfg: RoundConfig, pairs_url: str, output_url: str, pairs: Pairs | None = None
) -> dict[str, Any]:
    """Train this rank (the whole run when there is one process); return the run's manifest.

    Resumes from the last complete checkpoint in the output; a finished run with the same settings and
    pairs returns its manifest without training.
    """
    tcfg = cfg.training
    output_url = output_url.rstrip("/")
    if os.environ.get(LAUNCHED_BY, "").isdigit():
        stop_with_launcher(int(os.environ[LAUNCHED_BY]))
    identity = run_identity(cfg, pairs.sha256 if pairs is not None else pairs_sha256(pairs_url))
    done = finished_manifest(output_url, identity)
    if done is not None:
        say(f"{output_url} is already trained ({done.get('steps')} steps): nothing to do")
        return done
    check_run_identity(output_url, identity, write=False)
    staging = staging_dir(output_url)
    remote = not storage.is_local(output_url)
    setup = prepare_training(cfg, pairs_url, str(staging), pairs)
    trainer, pairs = setup.trainer, setup.pairs
    is_main = trainer.args.process_index == 0
    if is_main:
        check_run_identity(output_url, identity, write=True)
        if remote:
            download_last_checkpoint(output_url, staging)
            trainer.add_callback(_checkpoint_sync_callback(output_url, str(staging)))
    elif remote:
        trainer.add_callback(_checkpoint_sync_callback(output_url, str(staging)))
    trainer.accelerator.wait_for_everyone()
    resume = last_checkpoint(staging / "checkpoints")
    resume_step = int(resume.name[11:]) if resume else 0
    rows_before: list[int] | None = []
    if resume is not None:
        rows_before = rows_seen_at(resume, trainer.args.process_index, setup.world_size)
        trainer.rows_seen = list(rows_before or [])
    if is_main:
        dropped = sum(pairs.drops.values())
        say(
            f"{tcfg.objective} on {len(pairs.dataset)} pairs ({dropped} dropped as too long), "
            f"{setup.world_size} process(es), global batch {tcfg.global_batch_size} = "
            f"{tcfg.per_device_batch_size} x {trainer.args.gradient_accumulation_steps} x {setup.world_size}, "
            f"{'LoRA' if tcfg.lora.enabled else 'full fine-tune'}, {tcfg.precision}"
        )
        repeats = repeated_rows(len(pairs.dataset), tcfg.per_device_batch_size, setup.world_size)
        if repeats:
            say(
                f"{repeats} rows of each epoch are trained twice: {len(pairs.dataset)} pairs do not fill "
                f"whole batches of {tcfg.per_device_batch_size} on {setup.world_size} processes, and every "
                "process trains the same number of full batches (accelerate's even_batches)"
            )
        if resume is not None:
            say(f"resuming from {resume.name} (step {resume_step})")
            if rows_before is None:
                say(
                    f"{resume.name} does not record the rows trained before it: rows and tokens count "
                    f"from step {resume_step} on"
                )

    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.perf_counter() - started

    from accelerate.utils import gather_object

    rank_info = {
        "rank": trainer.args.process_index,
        "rows": [pairs.prompt_ids[r] for r in trainer.rows_seen],
        "tokens": sum(pairs.tokens[r] for r in trainer.rows_seen),
        # Trained by this process since it started (the rest before the checkpoint it resumed from).
        "tokens_now": sum(pairs.tokens[r] for r in trainer.rows_seen[len(rows_before or []) :]),
        "trainable_sha256": trainable_sha256(trainer.accelerator.unwrap_model(trainer.model)),
    }
    ranks = gather_object([rank_info]) if setup.world_size > 1 else [rank_info]
    model_dir = staging / ("adapter" if tcfg.lora.enabled else "full")
    trainer.save_model(str(model_dir))  # every rank: ZeRO-3 gathers the shards here
    manifest: dict[str, Any] = {}
    if is_main:
        if tcfg.lora.enabled and tcfg.merge:
            _merge_adapter(setup, model_dir, staging / "full", tcfg)
        tokens = sum(r["tokens"] for r in ranks)
        tokens_now = sum(r["tokens_now"] for r in ranks)  # what `seconds` timed
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
            "warmup_steps": getattr(trainer, "warmup_steps", None),
            "epochs": trainer.state.epoch,
            "resumed_from": resume.name if resume else None,
            "resumed_from_step": resume_step,
            # False only when a checkpoint without rows_seen.json was resumed: rows count from that step.
            "rows_counted_from_start": rows_before is not None,
            "rows_in": pairs.rows_in,
            "rows": len(pairs.dataset),
            "drops": pairs.drops,
            # Rows trained twice to give every process full batches (data.repeated_rows); 0 on one process.
            "rows_repeated_per_epoch": repeated_rows(
                len(pairs.dataset), tcfg.per_device_batch_size, setup.world_size
            ),
            "rows_repeated": repeated_rows(
                len(pairs.dataset), tcfg.per_device_batch_size, setup.world_size, trainer.state.epoch
            ),
            "world_size": setup.world_size,
            "global_batch_size": tcfg.global_batch_size,
            "gradient_accumulation_steps": trainer.args.gradient_accumulation_steps,
            "seconds": round(seconds, 3),
            "tokens": tokens,
            "tokens_per_s": round(tokens_now / seconds, 2) if seconds > 0 else None,
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
            "device": device_name(trainer.args.use_cpu),
            "backend": backend(),
            "versions": versions(),
        }
        write_outputs(output_url, staging, remote, manifest, steps, ranks, tcfg)
        if not tcfg.keep_checkpoints:
            shutil.rmtree(staging / "checkpoints", ignore_errors=True)
            if remote:
                storage.remove(storage.join(output_url, "checkpoints"), recursive=True)
        say(
            f"done: {manifest['steps']} steps in {seconds:.1f} s, {tokens} tokens "
            f"({manifest['tokens_per_s']} tokens/s), final loss {manifest['final_loss']}; wrote {output_url}"
        )
    trainer.accelerator.wait_for_everyone()
    return manifest or {"rank": trainer.args.process_index, "complete": True}
