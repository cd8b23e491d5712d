"""Preference training (SAO.md step 6): SimPO by default, DPO or ORPO, over TRL with LoRA or full weights.

    sao train --config configs/cpu-smollm2.yaml --pairs artifacts/smollm2-cpu/round_001-.../pairs
    python -m sao_core.training.rank --config CFG --pairs URL --output URL    # one rank (torchrun, accelerate)

`train` validates everything it can before any process starts (objective, model path, pairs, lengths),
then trains in this process (`training.launcher: inprocess`) or under `accelerate launch` / `torchrun`
with `training.num_processes` ranks, streaming their output. Each rank runs `run_training`.

    data.py       pairs: find, load, check, measure and drop long rows (Pairs)
    arguments.py  batch split, PEFT config, TRL config and trainer class per objective
    run.py        one rank: tokenizer and model, the trainer, run_training
    outputs.py    run identity (training_hash), checkpoints, staging and upload, the files written
    plots.py      the train log and its curves
    launch.py     checks before training, launching ranks, train, default_output_url

The output folder ({round}/model/{hash of the training section}/ by default, any fsspec URL) holds:

    adapter/            LoRA adapter (PEFT save_pretrained) and tokenizer
    full/               full model: full fine-tune, or the merged LoRA when training.merge
    checkpoints/        checkpoint-N every training.checkpoint_steps; a rerun resumes from the last one
    train_log.json      per-step loss, rewards/margins, rewards/accuracies, lr, ...
    train_curves.png    the curves of train_log.json
    ranks.json          rows each rank trained on, and a hash of its final trainable weights
    run.json            what is being trained (training_hash, pairs hash, model): a rerun must match it
    manifest.json       written last: the run is finished and is not redone

A remote output (s3://...) trains into a local staging folder and uploads every checkpoint and the final
files; a restarted run downloads the last uploaded checkpoint first.

Importing this package is light: torch, transformers, TRL, PEFT, datasets and matplotlib are imported
by the functions that use them.
"""

from __future__ import annotations

from sao_core.training.launch import default_output_url, train
from sao_core.training.outputs import training_hash
from sao_core.training.run import load_model, load_tokenizer, run_training

__all__ = [
    "default_output_url",
    "load_model",
    "load_tokenizer",
    "run_training",
    "train",
    "training_hash",
]
