"""From our training section to TRL: the batch split, the PEFT config, TRL's config and trainer per objective.

TRL implements all three objectives in 1.16: SimPO as CPOTrainer(loss_type="simpo", cpo_alpha=0) in
trl.experimental.cpo, ORPO in trl.experimental.orpo, DPO in trl. Every TRL setting we rely on is set in
`build_trl_config`: TRL's defaults move between releases (bf16, gradient checkpointing, lr, logging).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sao_core.config import TrainingConfig
from sao_core.errors import ConfigError
from sao_core.training.data import ROW_COLUMN, quiet_libraries

OBJECTIVES = ("simpo", "dpo", "orpo")
REPO_ROOT = Path(__file__).resolve().parents[2]


def gradient_accumulation_steps(tcfg: TrainingConfig, world_size: int) -> int:
    """Accumulation that makes per-device batch x accumulation x processes equal the global batch."""
    per_step = tcfg.per_device_batch_size * world_size
    if tcfg.global_batch_size % per_step:
        raise ConfigError(
            f"training.global_batch_size ({tcfg.global_batch_size}) is not a multiple of "
            f"per_device_batch_size x processes ({tcfg.per_device_batch_size} x {world_size} = {per_step})"
        )
    return tcfg.global_batch_size // per_step


def deploy_path(path: str, key: str) -> str:
    """A deployments/ file named relative to the working folder or to the repository."""
    for candidate in (Path(path).expanduser(), REPO_ROOT / path):
        if candidate.is_file():
            return str(candidate.resolve())
    raise ConfigError(
        f"{key}: file {path!r} not found (relative paths are tried from here and from {REPO_ROOT})"
    )


# The package each of TRL's reporters needs (transformers.integrations); tensorboardX also serves.
_REPORTER_PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboardX"),
    "mlflow": ("mlflow",),
    "wandb": ("wandb",),
}


def reporters(tcfg: TrainingConfig) -> list[str]:
    """training.report_to as TRL's `report_to`: the reporters named, each with its package installed
    (ConfigError naming the one missing); [] for none."""
    import importlib.util

    chosen: list[str] = [r for r in tcfg.report_to if r != "none"]
    for name in chosen:
        if not any(importlib.util.find_spec(m) for m in _REPORTER_PACKAGES[name]):
            raise ConfigError(
                f"training.report_to names {name!r}, but this environment has none of "
                f"{', '.join(_REPORTER_PACKAGES[name])} installed: install it or drop it from report_to"
            )
    return chosen


def report_into(trainer: Any, logging_dir: str) -> None:
    """Have the TensorBoard reporter write its event files under `logging_dir` (the run's logs/, which its
    output keeps) rather than under output_dir/runs/, inside the checkpoints a finished run removes.
    transformers 5 dropped TrainingArguments.logging_dir; its callback reads its folder from itself
    (or TENSORBOARD_LOGGING_DIR, which would reach every run in the process)."""
    from transformers.integrations import TensorBoardCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback):
            callback.logging_dir = logging_dir


def check_objective(objective: str) -> None:
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
    """TRL's config for the objective, with every setting we rely on set explicitly (training.report_to
    included: see reporters and report_into)."""
    check_objective(tcfg.objective)
    report_to = reporters(tcfg)
    if use_cpu and tcfg.precision == "fp16":
        raise ConfigError("training.precision 'fp16' needs a GPU; use 'bf16' or 'fp32' on CPU")
    deepspeed = deploy_path(tcfg.deepspeed, "training.deepspeed") if tcfg.deepspeed else None
    quiet_libraries()
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
        report_to=report_to or "none",
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


def trainer_class(objective: str) -> type:
    """TRL's trainer for the objective, which also records the rows each step trains on."""
    check_objective(objective)
    quiet_libraries()
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
        warmup_steps: int = 0  # the warmup the run used (training.warmup_ratio, capped: create_scheduler)

        def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
            # transformers' warmup starts at learning rate 0, so a warmup as long as the run (one or two
            # steps: a small round) trains nothing at all; it is cut to leave the last step at full rate.
            warmup = self.args.get_warmup_steps(num_training_steps)
            if num_training_steps > 0 and warmup >= num_training_steps:
                self.args.warmup_steps = num_training_steps - 1
            self.warmup_steps = self.args.get_warmup_steps(num_training_steps)
            return super().create_scheduler(num_training_steps, optimizer)

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
