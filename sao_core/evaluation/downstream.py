"""Downstream skills: lm-evaluation-harness tasks run on the candidate, and a check that none fell far.

    base = run_downstream(resolve_model("bundled:smollm2-135m-instruct"), ["sao_arith", "sao_capitals"])
    new = run_downstream(base_dir, ["sao_arith", "sao_capitals"], adapter=resolve_adapter(adapter_url))
    failures = compare_downstream(new, base, max_drop_points=5.0)   # ["sao_arith acc fell 7.5 points ..."]

Preference training can cost a model skills its preference data never asks about (SAO.md, evaluation);
these tasks measure them. Task names are lm-eval's: the bundled tasks in sao_core/data/lm_eval_tasks/
(sao_arith, sao_capitals: 20 multiple-choice questions each, written for this project), any task YAML
under `include_path`, or lm-eval's own tasks (arc_easy, hellaswag, mmlu, ...).

Nothing is downloaded: the hub is switched to offline mode for the run. A task's data must be a local
file or already in the Hugging Face datasets cache; a task that would download fails with a
DownstreamError naming it. In a task YAML, local `dataset_kwargs.data_files` paths are relative to the
YAML file (lm-eval itself would read them relative to the working directory). That holds for a task named
in `tasks`; a group or tag is handed to lm-eval as it is, so its tasks need absolute paths or cached data.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import importlib
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from sao_core.errors import SAOError

__all__ = [
    "BUNDLED_TASKS",
    "DownstreamError",
    "compare_downstream",
    "parse_results",
    "resolve_data_files",
    "run_downstream",
    "task_folders",
]

BUNDLED_TASKS = Path(__file__).parents[1] / "data" / "lm_eval_tasks"

# Module-level switches that huggingface_hub, datasets and evaluate read at call time; the environment
# variables of the same names are read once, at import, so setting them in the call would do nothing.
_OFFLINE_SWITCHES = (
    ("huggingface_hub.constants", "HF_HUB_OFFLINE"),
    ("datasets.config", "HF_HUB_OFFLINE"),
    ("datasets.config", "HF_DATASETS_OFFLINE"),
    ("evaluate.config", "HF_EVALUATE_OFFLINE"),
)


class DownstreamError(SAOError, ValueError):
    """A downstream task cannot be found or loaded, or the model cannot be evaluated (the message names it)."""


def task_folders(include_path: str | None = None) -> list[Path]:
    """The folders searched for task YAMLs: the bundled one, then `include_path` (a local folder)."""
    folders = [BUNDLED_TASKS]
    if include_path:
        folder = Path(include_path).expanduser()
        if not folder.is_dir():
            raise DownstreamError(f"downstream include_path {include_path!r} is not a folder of task YAMLs")
        folders.append(folder.resolve())
    return folders


def _absolute(path: str, base_dir: Path) -> str:
    if "://" in path or Path(path).is_absolute():
        return path
    return str((base_dir / path).resolve())


def resolve_data_files(cfg: Mapping[str, Any], yaml_path: Path) -> dict[str, Any]:
    """A copy of a task config whose local `dataset_kwargs.data_files` are absolute, resolved against the
    YAML's folder; a local file that does not exist raises DownstreamError naming the task and the file.

    data_files may be a path, a list of paths, or a mapping split -> path(s), as datasets.load_dataset takes
    them. URLs (hf://, s3://, https://) are left as they are; offline, the task then fails when it loads.
    """
    out = copy.deepcopy(dict(cfg))
    task = out.get("task", yaml_path.stem)
    kwargs = out.get("dataset_kwargs")
    if not isinstance(kwargs, dict) or "data_files" not in kwargs:
        return out
    base_dir = yaml_path.parent

    def resolve(value: Any, where: str) -> Any:
        if isinstance(value, str):
            path = _absolute(value, base_dir)
            if "://" not in path and not Path(path).is_file():
                raise DownstreamError(
                    f"downstream task {task!r}: data file {path} ({where} in {yaml_path}) does not exist"
                )
            return path
        if isinstance(value, list):
            return [resolve(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, dict):
            return {k: resolve(v, f"{where}.{k}") for k, v in value.items()}
        raise DownstreamError(
            f"downstream task {task!r}: {where} in {yaml_path} must be a path, a list of paths or a "
            f"mapping split -> path(s), got {value!r}"
        )

    kwargs["data_files"] = resolve(kwargs["data_files"], "dataset_kwargs.data_files")
    return out


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Switch the Hugging Face hub, datasets and evaluate to offline mode, and back afterwards."""
    saved: list[tuple[Any, str, Any]] = []
    try:
        for module_name, attr in _OFFLINE_SWITCHES:
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                continue
            if hasattr(module, attr):
                saved.append((module, attr, getattr(module, attr)))
                setattr(module, attr, True)
        yield
    finally:
        for module, attr, value in reversed(saved):
            setattr(module, attr, value)


def _task_manager(names: Sequence[str], folders: list[Path]) -> Any:
    """lm-eval's TaskManager over our folders; lm-eval's own ~15,000 tasks are indexed (about 8 s) only
    when a name is not found in them."""
    from lm_eval.tasks import TaskManager

    local = TaskManager(include_path=[str(f) for f in folders], include_defaults=False)
    if all(name in local.task_index for name in names):
        return local
    manager = TaskManager(include_path=[str(f) for f in folders])
    unknown = [name for name in names if name not in manager.task_index]
    if unknown:
        problems = []
        for name in unknown:
            hint = difflib.get_close_matches(name, manager.all_tasks, n=3)
            problems.append(f"{name!r}" + (f" (did you mean {', '.join(map(repr, hint))}?)" if hint else ""))
        bundled = ", ".join(sorted(local.task_index)) or "none"
        raise DownstreamError(
            f"unknown downstream task {'; '.join(problems)}: not an lm-eval task nor a task YAML in "
            f"{', '.join(map(str, folders))} (bundled: {bundled})"
        )
    return manager


def _task_spec(manager: Any, name: str) -> str | dict[str, Any]:
    """What to hand lm-eval for `name`: a single task's config with its data files resolved, else the name
    (a group, a tag, or a task with no local data files)."""
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = manager.task_index[name]
    if entry.kind != Kind.TASK or entry.yaml_path is None:
        return name
    try:
        cfg = load_yaml(entry.yaml_path, resolve_func=True)
    except Exception as e:
        raise DownstreamError(f"downstream task {name!r}: cannot read {entry.yaml_path}: {e}") from e
    kwargs = cfg.get("dataset_kwargs")
    if not isinstance(kwargs, dict) or "data_files" not in kwargs:
        return name
    return resolve_data_files(cfg, Path(entry.yaml_path))


def _load_task(manager: Any, name: str) -> list[Any]:
    """The lm-eval Task or Group objects for one configured name; any failure names the task."""
    spec = _task_spec(manager, name)
    try:
        loaded = manager.load([spec])
    except Exception as e:
        raise DownstreamError(
            f"downstream task {name!r} failed to load ({type(e).__name__}: {e}). Nothing is downloaded "
            "here: give the task a local data file (dataset_path: json, dataset_kwargs.data_files) or put "
            "its dataset in the Hugging Face datasets cache first"
        ) from e
    groups, tasks = loaded.get("groups") or {}, loaded["tasks"]
    if name in groups:
        return [groups[name]]
    if name in tasks:
        return [tasks[name]]
    return list(tasks.values())  # a tag: the tasks it names


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def parse_results(raw: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """lm-eval's results dict as plain per-task (and per-group) records.

        {"sao_arith": {"n_samples": 20, "n_available": 20, "num_fewshot": 0,
                       "metrics": {"acc": {"value": 0.35, "stderr": 0.109, "higher_is_better": True}}}}

    A metric is named as lm-eval names it, less the default filter: "acc,none" is "acc", and
    "exact_match,strict-match" stays as it is. A stderr lm-eval could not compute ("N/A") is None, and so
    is any value that is not a finite number. n_available is the task's size before `limit` (None for a
    group); n_samples is what was scored.
    """
    results = raw.get("results") or {}
    n_samples = raw.get("n-samples") or {}
    better = raw.get("higher_is_better") or {}
    n_shot = raw.get("n-shot") or {}
    subtasks = raw.get("group_subtasks") or {}
    out: dict[str, dict[str, Any]] = {}
    for task, entry in results.items():
        metrics: dict[str, dict[str, Any]] = {}
        for key, value in entry.items():
            metric, comma, filter_name = str(key).partition(",")
            if not comma or metric.endswith("_stderr"):
                continue
            name = metric if filter_name == "none" else f"{metric},{filter_name}"
            metrics[name] = {
                "value": _number(value),
                "stderr": _number(entry.get(f"{metric}_stderr,{filter_name}")),
                "higher_is_better": bool((better.get(task) or {}).get(metric, True)),
            }
        counts = n_samples.get(task) or {}
        record: dict[str, Any] = {
            "n_samples": entry.get("sample_len", counts.get("effective")),
            "n_available": counts.get("original"),
            "num_fewshot": n_shot.get(task),
            "metrics": metrics,
        }
        if task in subtasks:
            record["subtasks"] = list(subtasks[task])
        out[str(task)] = record
    return out


def _device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_downstream(
    model_dir: str,
    tasks: Sequence[str],
    *,
    adapter: str | None = None,
    include_path: str | None = None,
    limit: int | None = None,
    batch_size: int | str = 8,
    device: str = "auto",
    dtype: str = "auto",
    num_fewshot: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Run lm-eval tasks on a local model folder (plus an optional local LoRA adapter folder) with its
    Hugging Face backend, offline; return {"lm_eval_version", "tasks": parse_results(...), settings}.

    model_dir and adapter are local folders: resolve references and URLs with sao_core.store.models first.
    limit caps the questions per task (None: all); num_fewshot None keeps each task's own.
    """
    import lm_eval

    if not tasks:
        raise DownstreamError("run_downstream needs at least one task name")
    if limit is not None and limit < 1:
        raise DownstreamError(f"downstream limit must be a number of questions >= 1 or None, got {limit!r}")
    for kind, folder in (("model", model_dir), ("adapter", adapter)):
        if folder is not None and not Path(folder).is_dir():
            raise DownstreamError(
                f"downstream {kind} {folder!r} is not a local folder (resolve it with "
                f"sao_core.store.models.resolve_{kind} first)"
            )
    start = time.perf_counter()
    names = list(dict.fromkeys(tasks))
    with _hub_offline():
        manager = _task_manager(names, task_folders(include_path))
        # Tasks first: a missing data file fails in a second, before the model is loaded.
        objects = [obj for name in names for obj in _load_task(manager, name)]
        from lm_eval.models.huggingface import HFLM

        try:
            lm = HFLM(
                pretrained=model_dir,
                peft=adapter,
                device=_device(device),
                dtype=dtype,
                batch_size=batch_size,
                # the evaluated policy is our own trained model: nothing of its own to run
                trust_remote_code=False,
            )
        except Exception as e:
            raise DownstreamError(
                f"lm-eval could not load model {model_dir}"
                + (f" with adapter {adapter}" if adapter else "")
                + f": {type(e).__name__}: {e}"
            ) from e
        raw = lm_eval.simple_evaluate(
            model=lm,
            tasks=objects,
            task_manager=manager,
            num_fewshot=num_fewshot,
            limit=limit,
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    if raw is None:  # lm-eval returns None on ranks other than 0; this runs as one process
        raise DownstreamError("lm-eval returned no results (not rank 0?)")
    return {
        "lm_eval_version": raw.get("lm_eval_version") or lm_eval.__version__,
        "model": model_dir,
        "adapter": adapter,
        "limit": limit,
        "num_fewshot": num_fewshot,
        "seed": seed,
        "seconds": round(time.perf_counter() - start, 2),
        "tasks": parse_results(raw),
    }


def compare_downstream(
    candidate: Mapping[str, Any], baseline: Mapping[str, Any], max_drop_points: float
) -> list[str]:
    """Every metric of the baseline that the candidate lost more than `max_drop_points` on, as messages
    such as "sao_arith acc fell 7.5 points (62.5 -> 55.0), more than 5.0"; empty when none did.

    Takes two run_downstream results. Points are hundredths of a 0-1 metric; for a lower-is-better metric
    a rise is the loss. Metrics outside 0-1 (perplexities, bits per byte) have no points scale and are
    left out. A baseline task or metric missing from the candidate, a value that is not a number, or a
    task scored on another number of questions is a failure too: the scores would not be comparable.
    """
    if max_drop_points < 0:
        raise ValueError(f"max_drop_points must be >= 0, got {max_drop_points!r}")
    new_tasks = candidate.get("tasks") or {}
    failures: list[str] = []
    for task, base in (baseline.get("tasks") or {}).items():
        new = new_tasks.get(task)
        if new is None:
            failures.append(f"{task} is missing from the candidate's results")
            continue
        if new.get("n_samples") != base.get("n_samples"):
            failures.append(
                f"{task} was scored on {new.get('n_samples')} questions, the baseline on "
                f"{base.get('n_samples')}: the scores are not comparable"
            )
            continue
        for metric, before in base.get("metrics", {}).items():
            after = new.get("metrics", {}).get(metric)
            if after is None:
                failures.append(f"{task} {metric} is missing from the candidate's results")
                continue
            b, c = before.get("value"), after.get("value")
            if b is None or c is None:
                failures.append(f"{task} {metric} has no value (baseline {b}, candidate {c})")
                continue
            if not (0.0 <= b <= 1.0 and 0.0 <= c <= 1.0):
                continue
            higher_is_better = before.get("higher_is_better", True)
            # Rounded so a drop of exactly the limit (0.65 -> 0.60 is 5.000000000000004 points) passes.
            loss = round(100 * ((b - c) if higher_is_better else (c - b)), 9)
            if loss > max_drop_points:
                verb = "fell" if higher_is_better else "rose"
                failures.append(
                    f"{task} {metric} {verb} {loss:.1f} points ({100 * b:.1f} -> {100 * c:.1f}), "
                    f"more than {max_drop_points:.1f}" + ("" if higher_is_better else " (lower is better)")
                )
    return failures
