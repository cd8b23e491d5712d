"""The `vllm` engine: vllm.LLM in a child process under the vLLM environment's interpreter.

vLLM pins packages that clash with Prefect's (ENV.md) and holds its GPU for the life of its process, so it
never runs inside the orchestration process (STYLE.md rule 6). Two ways in:

    run_shard_in_child("responses", cfg, round_url, 3)   # one shard: python -m sao_core.stages.responses
    engine = make_engine(cfg.engine, cfg.model)           # VLLMEngine: a worker child held open
    engine.generate(requests, sampling); engine.close()

Both start `engine.python` (default: this interpreter); the child loads the model once, and a crash or an
OOM kill of the child fails that shard or call with the child's last log lines, and nothing else. This
module never imports vllm: the child's side is sao_core.engines.vllm_worker.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from sao_core import storage
from sao_core.config import EngineConfig, ModelConfig, RoundConfig, config_to_dict
from sao_core.engines import ChatRequest, Completion, Sampling
from sao_core.errors import ConfigError, EngineError, StorageError
from sao_core.models import model_revision, resolve_model
from sao_core.storage import ShardManifest

log = logging.getLogger(__name__)
child_log = logging.getLogger("sao_core.engines.vllm.child")

TAIL_LINES = 40  # how much of a failed child's log goes into the error
FINISH_REASONS = ("stop", "length")


# --- pure helpers, shared with the worker ------------------------------------------------------------------


def request_seed(seed: int, request_id: str, index: int = 0) -> int:
    """A per-request sampling seed, so a request's text does not depend on its batch or shard neighbours."""
    digest = hashlib.sha256(f"{seed}\x1f{request_id}\x1f{index}".encode()).hexdigest()
    return int(digest[:8], 16)


def llm_kwargs(
    engine: EngineConfig, model_dir: str, seed: int, on_cpu: bool, revision: str | None = None
) -> dict:
    """Keyword arguments of `vllm.LLM` from the engine section.

    On CPU: float32 for dtype "auto" and eager mode always (vLLM's CPU backend, ENV.md "vLLM on CPU").
    """
    kwargs: dict[str, Any] = {
        "model": model_dir,
        "seed": seed,
        "dtype": "float32" if on_cpu and engine.dtype == "auto" else engine.dtype,
        "enforce_eager": engine.enforce_eager or on_cpu,
        "tensor_parallel_size": engine.tensor_parallel_size,
        "gpu_memory_utilization": engine.gpu_memory_utilization,
        "disable_log_stats": True,
    }
    if engine.max_model_len is not None:
        kwargs["max_model_len"] = engine.max_model_len
    if revision and not Path(model_dir).is_dir():
        kwargs["revision"] = revision  # a hub id; a local folder has no revisions
    return kwargs


def sampling_kwargs(sampling: Sampling, request: ChatRequest) -> dict[str, Any]:
    """Keyword arguments of `vllm.SamplingParams` for one request."""
    return {
        "n": request.n,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_tokens": sampling.max_tokens,
        "seed": request_seed(sampling.seed, request.request_id),
    }


def conversation(request: ChatRequest) -> list[dict[str, str]]:
    """The request's messages, plus its prefill as an unfinished assistant turn for the model to continue."""
    messages = [m.to_dict() for m in request.messages]
    if request.prefill:
        messages.append({"role": "assistant", "content": request.prefill})
    return messages


def to_completion(
    text: str, finish_reason: str | None, prompt_tokens: int, completion_tokens: int, where: str
) -> Completion:
    """A Completion, refusing finish reasons other than stop/length (an aborted request is no answer)."""
    if finish_reason not in FINISH_REASONS:
        raise EngineError(
            f"{where}: finish_reason {finish_reason!r}, expected one of {', '.join(FINISH_REASONS)}"
        )
    return Completion(text, finish_reason, prompt_tokens, completion_tokens)


def completion_to_dict(c: Completion) -> dict[str, Any]:
    return {
        "text": c.text,
        "finish_reason": c.finish_reason,
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens,
    }


def request_to_dict(r: ChatRequest) -> dict[str, Any]:
    return {
        "request_id": r.request_id,
        "messages": [m.to_dict() for m in r.messages],
        "n": r.n,
        "kind": r.kind,
        "prefill": r.prefill,
    }


def config_overrides(base: Mapping[str, Any], want: Mapping[str, Any], prefix: str = "") -> list[str]:
    """`key=value` overrides that turn config mapping `base` into `want` (values as JSON, which YAML reads)."""
    out = []
    for key, value in want.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), Mapping):
            out.extend(config_overrides(base[key], value, f"{prefix}{key}."))
        elif base.get(key) != value:
            out.append(f"{prefix}{key}={json.dumps(value)}")
    return out


# --- the child process -------------------------------------------------------------------------------------


def interpreter(engine: EngineConfig) -> str:
    """The vLLM environment's python: engine.python (a path or a name on PATH), else this interpreter."""
    if engine.python is None:
        return sys.executable
    found = shutil.which(engine.python)
    if found is None:
        raise ConfigError(
            f"engine.python {engine.python!r} is not an executable; build the vLLM environment with "
            "scripts/setup_vllm_env.sh and point engine.python at .venv-vllm/bin/python"
        )
    return str(Path(found).absolute())  # absolute, not resolved: a venv's python is a symlink into its base


def child_env() -> dict[str, str]:
    """The child's environment: ours, marked as a stage child, with this sao_core first on its path."""
    env = dict(os.environ)
    env["SAO_STAGE_CHILD"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    # The child runs the same sao_core source as the parent, whatever its environment has installed.
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


class ChildProcess:
    """A child in a session of its own whose output is drained by a thread, keeping its last lines."""

    def __init__(self, cmd: list[str], what: str, pass_fds: Sequence[int] = ()) -> None:
        self.cmd = cmd
        self.what = what
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.started = time.perf_counter()
        log.info("%s: starting %s", what, " ".join(cmd))
        try:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=child_env(),
                # A group of its own, so vLLM's engine-core and worker processes can be ended with it.
                start_new_session=True,
                pass_fds=tuple(pass_fds),
            )
        except OSError as e:
            raise EngineError(f"{what}: cannot start {cmd[0]}: {e}") from e
        self._reader = threading.Thread(target=self._drain, name=f"drain-{self.proc.pid}", daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            self.tail.append(line)
            child_log.debug("[%d] %s", self.proc.pid, line)

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout)

    def kill_group(self) -> None:
        """End the child and anything it left behind (vLLM's engine core and workers)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._reader.join(timeout=5)

    def failure(self, rc: int | None = None, context: str = "") -> EngineError:
        """An EngineError naming the exit status and quoting the child's last log lines."""
        self._reader.join(timeout=5)
        rc = self.proc.poll() if rc is None else rc
        if rc is None:
            status = "stopped answering"
        elif rc < 0:
            try:
                name = signal.Signals(-rc).name
            except ValueError:
                name = f"signal {-rc}"
            hint = " (killed: out of memory?)" if -rc == signal.SIGKILL else ""
            status = f"was killed by {name}{hint}"
        else:
            status = f"exited with code {rc}"
        lines = "\n".join(f"    {line}" for line in self.tail) or "    (no output)"
        extra = f" {context}" if context else ""
        return EngineError(
            f"{self.what}: the vLLM child ({self.cmd[0]}) {status}{extra}; its last log lines:\n{lines}"
        )


def run_shard_in_child(stage: str, cfg: RoundConfig, round_dir: str, index: int) -> ShardManifest:
    """Run one shard in `python -m sao_core.stages.<stage>` under engine.python; return its verified manifest.

    The child reads the round's resolved_config.yaml (plus overrides for anything the caller's config
    changes), gets the model folder resolved here, and writes the shard and its manifest itself. A shard
    counts as done only if its manifest verifies against the input and parameters computed here.
    """
    from sao_core.stages.cli import shard_target

    what = f"{stage} shard {index}"
    if round_dir.startswith("memory://"):
        raise StorageError(
            f"{what}: the vllm engine writes shards from a child process, which cannot see {round_dir}; "
            "use a folder or an object store for run.root"
        )
    config_url = storage.join(round_dir, "resolved_config.yaml")
    if not storage.exists(config_url):
        raise StorageError(f"{what}: {config_url} is missing; the round folder comes from prepare_round(cfg)")
    import yaml

    resolved = yaml.safe_load(storage.read_text(config_url)) or {}
    overrides = config_overrides(resolved, config_to_dict(cfg))
    target = shard_target(stage, cfg, round_dir, index)
    cmd = [
        interpreter(cfg.engine),
        "-m",
        f"sao_core.stages.{stage}",
        "--config",
        config_url,
        "--round",
        round_dir,
        "--shard",
        str(index),
        "--model-dir",
        resolve_model(cfg.model.path),
    ]
    for override in overrides:
        cmd += ["--set", override]
    child = ChildProcess(cmd, what)
    try:
        rc = child.wait()
    finally:
        child.kill_group()
    seconds = time.perf_counter() - child.started
    if rc != 0:
        raise child.failure(rc)
    entry = storage.shard_is_done(target.out_url, index, target.input_sha256, target.params_hash)
    if entry is None:
        raise child.failure(rc, context="but left no shard that verifies against its manifest")
    log.info("%s: vLLM child finished in %.1fs (%d rows out)", what, seconds, entry.rows_out)
    return entry


# --- the engine for callers outside the shard runner ----------------------------------------------------------


class VLLMEngine:
    """The `vllm` engine behind the Engine interface: a worker child holding one vllm.LLM until close().

    Requests and completions travel as JSON lines over two pipes of their own (vLLM logs to stdout).
    `start_seconds` is the child's start-up (interpreter, vLLM import, model load); `generate` then adds
    only the round trip of the JSON.
    """

    name = "vllm"

    def __init__(self, engine: EngineConfig, model: ModelConfig, seed: int = 0) -> None:
        self.model = model.path
        model_dir = resolve_model(model.path)
        self.model_revision = model_revision(model.path, model_dir, model.revision)
        cmd_read, cmd_write = os.pipe()
        reply_read, reply_write = os.pipe()
        cmd = [
            interpreter(engine),
            "-m",
            "sao_core.engines.vllm_worker",
            "--commands-fd",
            str(cmd_read),
            "--replies-fd",
            str(reply_write),
        ]
        try:
            self._child = ChildProcess(cmd, f"vllm engine ({model.path})", pass_fds=(cmd_read, reply_write))
        finally:
            os.close(cmd_read)
            os.close(reply_write)
        self._commands: IO[str] = os.fdopen(cmd_write, "w", encoding="utf-8")
        self._replies: IO[str] = os.fdopen(reply_read, "r", encoding="utf-8")
        self._lock = threading.Lock()
        start = {
            "op": "start",
            "engine": engine.model_dump(mode="json"),
            "model": model.model_dump(mode="json"),
            "model_dir": model_dir,
            "seed": seed,
        }
        try:
            reply = self._call(start)
        except BaseException:
            self._child.kill_group()
            raise
        self.start_seconds = time.perf_counter() - self._child.started
        self.load_seconds = float(reply.get("load_seconds", 0.0))
        log.info("vllm engine ready in %.1fs (model load %.1fs)", self.start_seconds, self.load_seconds)

    def _call(self, message: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            try:
                self._commands.write(json.dumps(message) + "\n")
                self._commands.flush()
                line = self._replies.readline()
            except (BrokenPipeError, ValueError, OSError):
                line = ""
            if not line:
                try:
                    rc: int | None = self._child.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    rc = None
                error = self._child.failure(rc)
                self._child.kill_group()
                raise error
        reply: dict[str, Any] = json.loads(line)
        if not reply.get("ok"):
            raise EngineError(f"vllm engine ({self.model}): {reply.get('error', 'unknown error')}")
        return reply

    def generate(self, requests: Sequence[ChatRequest], sampling: Sampling) -> list[list[Completion]]:
        if not requests:
            return []
        reply = self._call(
            {
                "op": "generate",
                "requests": [request_to_dict(r) for r in requests],
                "sampling": {
                    "temperature": sampling.temperature,
                    "top_p": sampling.top_p,
                    "max_tokens": sampling.max_tokens,
                    "seed": sampling.seed,
                },
            }
        )
        outputs = [[Completion(**c) for c in row] for row in reply["outputs"]]
        if len(outputs) != len(requests) or any(
            len(o) != r.n for o, r in zip(outputs, requests, strict=True)
        ):
            raise EngineError(f"vllm engine ({self.model}): wrong number of completions from the worker")
        return outputs

    def close(self) -> None:
        """Ask the worker to exit; end its process group if it does not within 60 s."""
        if self._child.proc.poll() is None:
            try:
                self._call({"op": "close"})
                self._child.wait(timeout=60)
            except (EngineError, subprocess.TimeoutExpired):
                pass
        self._child.kill_group()
        for f in (self._commands, self._replies):
            with contextlib.suppress(OSError):
                f.close()
