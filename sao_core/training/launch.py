"""Starting a training run: every check first, then this process or `training.num_processes` launched ranks."""

from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from sao_core.config import RoundConfig, TrainingConfig, config_to_yaml
from sao_core.errors import ConfigError, TrainingError
from sao_core.store import locks, storage
from sao_core.store.layout import round_url
from sao_core.store.models import resolve_model
from sao_core.training.arguments import REPO_ROOT, check_objective, deploy_path, gradient_accumulation_steps
from sao_core.training.data import Pairs, load_pairs, prepare_pairs
from sao_core.training.outputs import finished_manifest, run_identity, train_claim_url, training_hash
from sao_core.training.run import LAUNCHED_BY, load_tokenizer, local_adapter, run_training, say

DEFAULT_ACCELERATE_CONFIG = "deployments/accelerate/ddp.yaml"


def check_inputs(cfg: RoundConfig, pairs_url: str) -> Pairs:
    """Every check that needs no training: objective, batch split, deployment files, pairs, model path.

    The pairs' columns and rows are checked before the model is found or its tokenizer loaded (a hub id
    downloads the weights): a pairs file that cannot train fails in seconds. Their lengths need the
    tokenizer, and are measured after."""
    tcfg = cfg.training
    check_objective(tcfg.objective)
    gradient_accumulation_steps(tcfg, tcfg.num_processes)
    if tcfg.deepspeed:
        deploy_path(tcfg.deepspeed, "training.deepspeed")
    if tcfg.launcher == "accelerate":
        deploy_path(tcfg.accelerate_config or DEFAULT_ACCELERATE_CONFIG, "training.accelerate_config")
    loaded = load_pairs(pairs_url)
    model_path = resolve_model(cfg.model.path)
    if cfg.model.adapter:
        if tcfg.deepspeed:
            # ZeRO-3 shards the weights as they load, so the adapter cannot be merged into them there.
            raise ConfigError(
                "model.adapter with training.deepspeed is not supported: merge the adapter into a full "
                "model first (training.merge) and train from that"
            )
        local_adapter(cfg.model.adapter)  # a URL is fetched into the model cache here, once for every rank
    return prepare_pairs(
        pairs_url,
        load_tokenizer(model_path, cfg.model.revision, cfg.model.trust_remote_code),
        tcfg,
        loaded=loaded,
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_launch_command(tcfg: TrainingConfig, stage_args: list[str], port: int) -> list[str]:
    """The accelerate or torchrun command that starts num_processes ranks of sao_core.training.rank."""
    n = str(tcfg.num_processes)
    if tcfg.launcher == "torchrun":
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", n]
        launcher += ["--master_addr", "127.0.0.1", "--master_port", str(port)]
    elif tcfg.launcher == "accelerate":
        config = deploy_path(
            tcfg.accelerate_config or DEFAULT_ACCELERATE_CONFIG, "training.accelerate_config"
        )
        # accelerate's --cpu starts one process unless MPI is there (ENV.md); a DDP config launches through
        # torch.distributed.run on CPU too, and each rank picks gloo itself (build_trl_config).
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config]
        launcher += ["--num_processes", n, "--num_machines", "1", "--main_process_port", str(port)]
    else:
        raise ConfigError(f"training.launcher {tcfg.launcher!r} starts no processes")
    return [*launcher, "-m", "sao_core.training.rank", *stage_args]


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
    # The same spelling as the parent's claims and records (storage.normalise_url), not a symlink-resolved
    # one: a rank must write under the very URL the launching process holds the claim of.
    return storage.normalise_url(url)


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
        # The ranks run in a session of their own (stream_command): should this process die without
        # stopping them (SIGKILL), they stop themselves rather than train on beside the run that
        # resumes from their checkpoint (run.stop_with_launcher).
        env[LAUNCHED_BY] = str(os.getpid())
        say(f"launching {tcfg.num_processes} processes: {' '.join(cmd)}")
        stream_command(cmd, env, tcfg.launcher, cwd=cwd)
    manifest = storage.read_json(storage.join(output_url, "manifest.json"))
    if not isinstance(manifest, dict) or not manifest.get("complete"):
        raise TrainingError(f"training processes exited cleanly but {output_url} has no finished manifest")
    return manifest


def default_output_url(cfg: RoundConfig) -> str:
    """{round}/model/{training_hash}: each thing learned trains into its own folder, so retuning training
    never collides with a model trained from the same data, while a change of how a run is launched
    (launcher, processes, deployment, checkpoint cadence) resumes the same folder."""
    return storage.join(round_url(cfg), "model", training_hash(cfg))


def train(cfg: RoundConfig, pairs_url: str, output_url: str | None = None) -> dict[str, Any]:
    """Train on the pairs into output_url (default {round}/model), in this process or launched; the manifest.

    One trainer per output folder: the run holds the folder's claim (outputs.train_claim_url) while it
    trains, so a second `sao train` or round into the same folder waits, then finds it trained; a claim
    left by a killed trainer is taken over (at once on the same machine, else once it expires)."""
    output_url = (output_url or default_output_url(cfg)).rstrip("/")
    cfg = _absolute_model_paths(cfg)  # the launched ranks run from another folder
    pairs = check_inputs(cfg, pairs_url)
    identity = run_identity(cfg, pairs.sha256)
    done = finished_manifest(output_url, identity)
    if done is not None:
        say(f"{output_url} is already trained ({done.get('steps')} steps): nothing to do")
        return done
    with locks.hold(train_claim_url(output_url), f"training into {output_url}"):
        done = finished_manifest(output_url, identity)
        if done is not None:  # trained by the process whose claim we waited for
            say(f"{output_url} was trained meanwhile ({done.get('steps')} steps): nothing to do")
            return done
        if cfg.training.launcher == "inprocess":
            return run_training(cfg, pairs_url, output_url, pairs)
        return launch_distributed(cfg, pairs_url, output_url)
