"""Training throughput on the bundled SmolLM2 with LoRA: our stage vs a bare TRL script, and 1 vs 2 processes.

    .venv/bin/python -m bench.training_throughput [--pairs 16] [--repeats 2] [--no-processes]

Part 1 runs `sao_core.training.run_training` and a bare TRL script (CPOTrainer + LoRA, the same SimPO
settings, optimizer, pairs, seed and steps) side by side in one process, alternating, and alternating
which goes first. Both train one full epoch, so both train every pair exactly once and their token counts
are the same: the figure is train tokens/s (the time of `trainer.train()`), best of the repeats, and
their ratio (target >= 0.95). End-to-end seconds (model load, pair checks, outputs), best of the repeats
of each arm, are reported beside.

The two arms do the same work where it is not what is being measured:
- the bundled model is converted to its cached folder, and torch, transformers, TRL, PEFT, datasets and
  matplotlib are imported, before anything is timed: otherwise the first arm pays those one-time costs
  (3 to 6 s on 2 CPU cores) and the other does not;
- the bare arm keeps the stage's checkpoint schedule (transformers also saves one at the last step,
  inside `trainer.train()`) and writes the same train log and curves PNG; beyond that our stage checks
  and hashes the pairs and writes run.json, ranks.json and manifest.json, which is what the end-to-end
  difference shows.
Part 2 runs our stage with 1 process (in-process) and with 2 processes (torchrun, gloo on CPU) at the
same global batch; the 2-process end-to-end time includes starting the ranks (imports and a model load
each), which the in-process run, in this warmed-up process, does not pay. Tokens are prompt+chosen plus
prompt+rejected tokens of the pairs trained.
Writes bench/results/training_throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import machine, write_report
from sao_core.config import RoundConfig, build_config
from sao_core.store.models import resolve_model
from sao_core.training import run_training, train
from sao_core.training.plots import plot_curves, read_train_log

TOPICS = [
    "a weekly food budget",
    "learning Python",
    "a night shift",
    "a first novel",
    "a garden",
    "a 5 km run",
]


def write_pairs(folder: Path, n: int) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"Give me a practical plan for {topic}, step {i}."}],
                "chosen": [
                    {
                        "role": "assistant",
                        "content": f"Here is a plan for {topic}. Write down the goal and the time you have, "
                        "then split it into small weekly steps. " * (1 + i % 2),
                    }
                ],
                "rejected": [{"role": "assistant", "content": f"Just do {topic}. " * (2 + i % 4)}],
                "prompt_id": f"bench-{i}",
            }
        )
    (folder / "part-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder)


def bench_config(**training: Any) -> RoundConfig:
    settings = {
        "objective": "simpo",
        "precision": "fp32",  # CPU
        "learning_rate": 1e-5,
        "global_batch_size": 4,
        "per_device_batch_size": 2,
        "max_length": 512,
        "max_prompt_length": 256,
        "epochs": 1,
        "checkpoint_steps": 1000,
        "lora": {"r": 16, "alpha": 32},
        **training,
    }
    return build_config({"model": {"path": "bundled:smollm2-135m-instruct"}, "training": settings})


def warm_up(cfg: RoundConfig) -> float:
    """Convert and cache the bundled model and import the libraries both arms use; the seconds it took."""
    start = time.perf_counter()
    resolve_model(cfg.model.path)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import datasets  # noqa: F401
    import matplotlib.pyplot  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from trl.experimental.cpo import CPOTrainer  # noqa: F401

    return round(time.perf_counter() - start, 3)


def run_ours(cfg: RoundConfig, pairs: str, out: Path) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    manifest = run_training(cfg, pairs, str(out))
    return {
        "train_seconds": manifest["seconds"],
        "end_to_end_seconds": round(time.perf_counter() - start, 3),
        "steps": manifest["steps"],
        "tokens": manifest["tokens"],
    }


def run_bare_trl(cfg: RoundConfig, pairs: str, out: Path) -> dict[str, Any]:
    """What one would write by hand with TRL: no checks, no row bookkeeping; the adapter, the train log
    and its curves as outputs."""
    t = cfg.training
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()  # like ours, the clock runs from before the imports
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    path = resolve_model(cfg.model.path)
    dataset = load_dataset("json", data_files=f"{pairs}/part-00000.jsonl", split="train")
    dataset = dataset.select_columns(["prompt", "chosen", "rejected"])
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    args = CPOConfig(
        output_dir=str(out),
        loss_type="simpo",
        cpo_alpha=0.0,
        beta=t.beta,
        simpo_gamma=t.simpo_gamma,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,
        num_train_epochs=t.epochs,
        per_device_train_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.global_batch_size // t.per_device_batch_size,
        max_length=t.max_length,
        optim="adamw_torch",  # as our stage sets it (transformers 5's default is the fused one)
        bf16=False,
        activation_checkpointing=False,
        logging_steps=1,
        # The stage's checkpoint schedule: transformers also saves at the last step, inside train().
        save_strategy="steps",
        save_steps=t.checkpoint_steps,
        save_total_limit=t.save_total_limit,
        save_only_model=False,
        remove_unused_columns=False,  # CPOTrainer's collator needs the raw columns (it would set it itself)
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=t.seed,
        data_seed=t.seed,
    )
    peft_config = LoraConfig(
        r=t.lora.r,
        lora_alpha=t.lora.alpha,
        lora_dropout=t.lora.dropout,
        target_modules=list(t.lora.target_modules),
        task_type="CAUSAL_LM",
    )
    trainer = CPOTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
    )
    train_start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - train_start
    trainer.save_model(str(out / "adapter"))
    steps = read_train_log(trainer.state.log_history)
    (out / "train_log.json").write_text(json.dumps({"steps": steps}))
    (out / "train_curves.png").write_bytes(plot_curves(steps, "simpo (LoRA), bare TRL"))
    return {
        "train_seconds": round(train_seconds, 3),
        "end_to_end_seconds": round(time.perf_counter() - start, 3),
        "steps": trainer.state.global_step,
    }


def best(runs: list[dict[str, Any]], tokens: int) -> dict[str, Any]:
    """The fastest training and, on its own, the fastest end to end (the two may be different runs)."""
    fastest = min(runs, key=lambda r: r["train_seconds"])
    return {
        **fastest,
        "end_to_end_seconds": min(r["end_to_end_seconds"] for r in runs),
        "tokens": tokens,
        "tokens_per_s": round(tokens / fastest["train_seconds"], 1),
        "all_train_seconds": [r["train_seconds"] for r in runs],
        "all_end_to_end_seconds": [r["end_to_end_seconds"] for r in runs],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-processes", action="store_true", help="skip part 2 (1 vs 2 processes)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="sao-bench-train-"))
    pairs = write_pairs(work / "pairs", args.pairs)
    cfg = bench_config()
    warm_up_seconds = warm_up(cfg)
    print(f"warm-up (model cache, imports): {warm_up_seconds} s, not timed in either arm")
    ours_runs, bare_runs = [], []
    for i in range(args.repeats):
        # Alternate which goes first, so a slow spell on a shared machine does not always hit the same one.
        for which in ("ours", "bare") if i % 2 == 0 else ("bare", "ours"):
            if which == "ours":
                ours_runs.append(run_ours(cfg, pairs, work / f"ours-{i}"))
            else:
                bare_runs.append(run_bare_trl(cfg, pairs, work / f"bare-{i}"))
        print(
            f"repeat {i}: ours {ours_runs[-1]['train_seconds']} s, bare TRL {bare_runs[-1]['train_seconds']} s"
        )
    tokens = ours_runs[0]["tokens"]
    if any(r["steps"] != ours_runs[0]["steps"] for r in ours_runs + bare_runs):
        raise SystemExit("the runs trained different numbers of steps: the comparison is void")
    ours, bare = best(ours_runs, tokens), best(bare_runs, tokens)
    ratio = ours["tokens_per_s"] / bare["tokens_per_s"]

    processes: dict[str, Any] = {}
    if not args.no_processes:
        for n, launcher in ((1, "inprocess"), (2, "torchrun")):
            out = work / f"procs-{n}"
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            manifest = train(bench_config(launcher=launcher, num_processes=n), pairs, str(out))
            processes[str(n)] = {
                "launcher": launcher,
                "train_seconds": manifest["seconds"],
                "end_to_end_seconds": round(time.perf_counter() - start, 3),
                "steps": manifest["steps"],
                "tokens": manifest["tokens"],
                "tokens_per_s": manifest["tokens_per_s"],
                "backend": manifest.get("backend"),
                # in-process: torch's default threads; launched: OMP_NUM_THREADS = cores / processes
                "threads_per_process": machine()["torch_threads"]
                if n == 1
                else max(1, (os.cpu_count() or 1) // n),
            }

    payload = {
        "benchmark": "training_throughput",
        "model": cfg.model.path,
        "objective": "simpo",
        "lora_r": cfg.training.lora.r,
        "pairs": args.pairs,
        "global_batch_size": cfg.training.global_batch_size,
        "per_device_batch_size": cfg.training.per_device_batch_size,
        "steps": ours["steps"],
        "ours": ours,
        "bare_trl": bare,
        "ratio_ours_over_bare": round(ratio, 3),
        "warm_up_seconds": warm_up_seconds,
        "target_ratio": 0.95,
        "processes": processes,
        "machine": machine(),
    }
    lines = [
        "# Training throughput: SmolLM2-135M-Instruct, SimPO + LoRA, CPU",
        "",
        f"{args.pairs} pairs, 1 epoch = {ours['steps']} steps, global batch {cfg.training.global_batch_size}, "
        f"{tokens} tokens, best of {args.repeats}; {payload['machine']['when']}.",
        "",
        "| run | train s | tokens/s | end-to-end s |",
        "|---|---|---|---|",
        f"| our stage (run_training) | {ours['train_seconds']} | {ours['tokens_per_s']} | {ours['end_to_end_seconds']} |",
        f"| bare TRL CPOTrainer | {bare['train_seconds']} | {bare['tokens_per_s']} | {bare['end_to_end_seconds']} |",
        "",
        f"Ratio ours / bare: **{ratio:.3f}** (target >= 0.95). Before timing, both arms' one-time costs "
        f"(model cache, imports) were paid up front: {warm_up_seconds} s.",
        "",
    ]
    if processes:
        lines += [
            "| processes | launcher | threads each | train s | tokens/s | end-to-end s |",
            "|---|---|---|---|---|---|",
        ]
        for n, r in processes.items():
            lines.append(
                f"| {n} | {r['launcher']} | {r['threads_per_process']} | {r['train_seconds']} | "
                f"{r['tokens_per_s']} | {r['end_to_end_seconds']} |"
            )
        lines.append("")
    path = write_report("training_throughput", payload, "\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {path}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
