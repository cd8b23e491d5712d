"""Security (SECURITY.md): no credential in anything a round writes or shows; no model code runs unless the
config says so; model and data references only through the schemes the config allows; job templates that
do not run as root.

    .venv/bin/python -m pytest -q tests/reliability/test_security.py

The sentinel test runs a whole `sao run` (tiny recipe, scripted engine) in a subprocess with Prefect's
temporary server, PREFECT_HOME in a temporary folder and run.root on the moto S3 server, every credential
in the environment set to a unique sentinel (moto accepts any), then looks for the sentinels in every
object of the bucket, every file of the Prefect home and the model cache (the database included, its
blocks read back through the API because Prefect encrypts them), and the command's output.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from sao_core.config import DEFAULT_SCHEMES, ModelConfig, RoundConfig, build_config
from sao_core.errors import ConfigError
from sao_core.store.models import load_kwargs

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")
SAO_CORE = REPO / "sao_core"
POOLS = REPO / "deployments" / "pools"

# --- no credential in anything a round writes or shows ------------------------------------------------

SECRET_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "OPENAI_API_KEY",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "WANDB_API_KEY",
    "GITHUB_TOKEN",
    "POSTGRES_PASSWORD",
)

# Reads back, through Prefect's API, what the database keeps encrypted (block documents, with their
# secrets) or in its own tables (artifacts, logs, variables, flow and task runs with their parameters).
API_DUMP = """
import json
from prefect.client.orchestration import get_client

def everything(read, **kwargs):
    out, offset = [], 0
    while True:
        page = read(limit=200, offset=offset, **kwargs)
        out += [item.model_dump(mode="json") for item in page]
        if len(page) < 200:
            return out
        offset += 200

with get_client(sync_client=True) as client:
    dump = {
        "blocks": [b.model_dump(mode="json") for b in client.read_block_documents(include_secrets=True)],
        "artifacts": everything(client.read_artifacts),
        "logs": everything(client.read_logs),
        "flow_runs": everything(client.read_flow_runs),
        "task_runs": everything(client.read_task_runs),
        "variables": [v.model_dump(mode="json") for v in client.read_variables()],
        "deployments": [d.model_dump(mode="json") for d in client.read_deployments()],
    }
print(json.dumps(dump))
"""


def _sentinels() -> dict[str, str]:
    token = uuid.uuid4().hex[:12]
    return {name: f"SENTINEL{token}{name.replace('_', '')}" for name in SECRET_ENV}


def _leaks(blob: bytes, sentinels: dict[str, str]) -> list[str]:
    return [name for name, value in sentinels.items() if value.encode() in blob]


@pytest.mark.tier1
def test_no_credential_in_config_manifests_artifacts_blocks_logs_or_output(
    s3_env: str, tmp_path: Path
) -> None:
    import s3fs

    sentinels = _sentinels()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(sentinels)
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        SAO_CACHE=str(tmp_path / "cache"),
        HF_HUB_OFFLINE="1",
    )
    root = f"{s3_env}/rounds"
    sao = Path(sys.executable).parent / "sao"
    run = subprocess.run(
        [str(sao), "run", "--config", TINY, "--set", f"run.root={root}", "--set", "personas.n=4"],
        capture_output=True,
        env=env,
        timeout=900,
        cwd=REPO,
    )
    assert run.returncode == 0, (run.stdout[-3000:] + run.stderr[-3000:]).decode(errors="replace")
    where: dict[str, list[str]] = {}

    def look(name: str, blob: bytes) -> None:
        for leak in _leaks(blob, sentinels):
            where.setdefault(leak, []).append(name)

    look("sao run stdout", run.stdout)
    look("sao run stderr", run.stderr)
    # Every object the round wrote: resolved config, manifests, shards, model, report, Prefect's results.
    fs = s3fs.S3FileSystem()
    objects = fs.find(s3_env.removeprefix("s3://"))
    assert any(o.endswith("resolved_config.yaml") for o in objects)
    assert any("/_prefect_results/" in o for o in objects)
    for obj in objects:
        look(f"s3://{obj}", fs.cat_file(obj))
    # Every local file: the Prefect home (its sqlite database too) and the model cache.
    files = [p for d in ("prefect", "cache") for p in (tmp_path / d).rglob("*") if p.is_file()]
    assert any(p.suffix == ".db" for p in files)
    for path in files:
        look(str(path), path.read_bytes())
    # What Prefect's API gives back, encrypted blocks decrypted.
    dump = subprocess.run(
        [sys.executable, "-c", API_DUMP], capture_output=True, env=env, timeout=300, cwd=REPO
    )
    assert dump.returncode == 0, dump.stderr.decode(errors="replace")[-3000:]
    look("Prefect API: blocks, artifacts, logs, runs, variables", dump.stdout)
    assert not where, f"credentials found: {where}"

    data = json.loads(dump.stdout)
    assert data["artifacts"] and data["logs"] and data["task_runs"]  # the search had something to search
    # tasks/cache.py result_storage: the S3 result storage block holds the endpoint, never a key.
    [block] = [b for b in data["blocks"] if b["name"].startswith("sao-results-")]
    assert set(block["data"]["settings"]) <= {"client_kwargs"}
    assert set(block["data"]["settings"].get("client_kwargs", {})) <= {"endpoint_url"}


# --- no model code runs unless the config says so -------------------------------------------------------


def test_trust_remote_code_is_off_unless_the_config_turns_it_on() -> None:
    assert ModelConfig().trust_remote_code is False
    assert build_config({}).model.trust_remote_code is False
    assert build_config({}, ["model.trust_remote_code=true"]).model.trust_remote_code is True
    assert load_kwargs("/models/m", None, False) == {"trust_remote_code": False}
    assert load_kwargs("org/name", "abc", True) == {"trust_remote_code": True, "revision": "abc"}
    # Whether a model's code may run changes no text: it names the same round folder.
    base = build_config({})
    assert build_config({}, ["model.trust_remote_code=true"]) != base
    from sao_core.store.layout import round_url

    assert round_url(build_config({}, ["model.trust_remote_code=true"])) == round_url(base)


def _model_with_its_own_code(folder: Path, marker: Path) -> None:
    """A model folder whose config names Python code of its own (auto_map), code that leaves a file
    behind when it runs."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "sao-own-code",
                "auto_map": {"AutoConfig": "own_code.OwnConfig", "AutoModelForCausalLM": "own_code.OwnModel"},
            }
        )
    )
    (folder / "own_code.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import PretrainedConfig\n"
        "class OwnConfig(PretrainedConfig):\n    model_type = 'sao-own-code'\n"
    )


def test_a_model_that_brings_code_does_not_run_it(tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    folder, marker = tmp_path / "model", tmp_path / "code-ran"
    _model_with_its_own_code(folder, marker)
    for loader in (AutoConfig, AutoModelForCausalLM):
        with pytest.raises((ValueError, OSError)):
            loader.from_pretrained(str(folder), **load_kwargs(str(folder), None, False))
    assert not marker.exists()


def test_the_transformers_engine_does_not_run_a_models_code(tmp_path: Path) -> None:
    from sao_core.engines import make_engine
    from sao_core.store.models import TINY, bundled_model_dir

    folder, marker = tmp_path / "model", tmp_path / "code-ran"
    _model_with_its_own_code(folder, marker)
    tiny = bundled_model_dir(TINY)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "model.safetensors"):
        (folder / name).write_bytes((tiny / name).read_bytes())  # a real tokenizer: the model's code is next
    cfg = build_config({"model": {"path": str(folder)}, "engine": {"name": "transformers", "device": "cpu"}})
    with pytest.raises(Exception) as err:  # what transformers raises is its own business
        make_engine(cfg.engine, cfg.model)
    assert "trust_remote_code" in str(err.value) or "sao-own-code" in str(err.value)
    assert not marker.exists()


def test_persona_datasets_and_pairs_are_loaded_without_remote_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    from sao_core.stages.persona_sources import sample_personas
    from sao_core.training.data import load_pairs

    real = datasets.load_dataset
    calls: list[dict[str, Any]] = []

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    folder = tmp_path / "personas"
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps({"persona": "A baker who plans a menu."}) + "\n")
    cfg = build_config({"personas": {"source": "hf", "dataset": str(folder), "n": 1}})
    assert len(sample_personas(cfg.personas, seed=0)) == 1
    pairs = tmp_path / "pairs.jsonl"
    row = {
        "prompt": [{"role": "user", "content": "q"}],
        "chosen": [{"role": "assistant", "content": "a"}],
        "rejected": [{"role": "assistant", "content": "b"}],
    }
    pairs.write_text(json.dumps(row) + "\n")
    load_pairs(str(pairs))
    assert len(calls) == 2 and all(c.get("trust_remote_code") is False for c in calls), calls


# Loaders that can run a model's or a dataset's own code, and must say whether they may.
_LOADERS = {"load_dataset", "HFLM", "LLM"}


def _unsaid_loads(path: Path) -> list[str]:
    """Loader calls in a module that leave trust_remote_code to the library's default."""
    found = []
    tree = ast.parse(path.read_text())

    def from_load_kwargs(value: ast.AST | None) -> bool:
        return (
            isinstance(value, ast.Call)
            and getattr(value.func, "id", getattr(value.func, "attr", "")) == "load_kwargs"
        )

    # kwargs = load_kwargs(...); AutoTokenizer.from_pretrained(path, **kwargs)
    named = {
        t.id
        for node in ast.walk(tree)
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and from_load_kwargs(node.value)
        for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(t, ast.Name)
    }
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        receiver = (
            func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
        )
        if not (name in _LOADERS or (name == "from_pretrained" and receiver.startswith("Auto"))):
            continue
        said = any(k.arg == "trust_remote_code" for k in node.keywords) or any(
            k.arg is None
            and (from_load_kwargs(k.value) or (isinstance(k.value, ast.Name) and k.value.id in named))
            for k in node.keywords
        )
        if name == "LLM" and any(k.arg is None for k in node.keywords):
            said = True  # vllm.LLM(**llm_kwargs(...)): test_vllm_is_told_whether_to_run_model_code
        if not said:
            found.append(f"{path.relative_to(REPO)}:{node.lineno} {receiver + '.' if receiver else ''}{name}")
    return found


LOADING_MODULES = sorted(
    p
    for p in SAO_CORE.rglob("*.py")
    if any(word in p.read_text() for word in ("from_pretrained", "load_dataset", "HFLM(", "LLM("))
)


@pytest.mark.parametrize(
    "path",
    [pytest.param(p, id=str(p.relative_to(REPO))) for p in LOADING_MODULES],
)
def test_every_loader_is_told_whether_to_run_model_code(path: Path) -> None:
    assert not _unsaid_loads(path)


def test_vllm_is_told_whether_to_run_model_code() -> None:
    from sao_core.config import EngineConfig
    from sao_core.engines.vllm import llm_kwargs

    engine = EngineConfig(name="vllm")
    assert llm_kwargs(engine, "/models/m", 0, on_cpu=True)["trust_remote_code"] is False
    assert (
        llm_kwargs(engine, "/models/m", 0, on_cpu=True, trust_remote_code=True)["trust_remote_code"] is True
    )  # type: ignore[call-arg]


# --- schemes -----------------------------------------------------------------------------------------------


def test_the_default_schemes_are_local_object_stores_and_the_hub() -> None:
    assert DEFAULT_SCHEMES == ("file", "s3", "gs", "memory", "hf", "bundled")
    assert build_config({}).run.allowed_schemes == DEFAULT_SCHEMES


REFERENCE_KEYS = [
    "run.root",
    "model.path",
    "model.adapter",
    "personas.path",
    "evaluation.prompts",
    "evaluation.trust",
    "evaluation.original",
    "training.accelerate_config",
    "training.deepspeed",
    "evaluation.judge.model.path",
    "evaluation.judge.model.adapter",
]


@pytest.mark.parametrize("key", REFERENCE_KEYS)
def test_every_reference_is_checked_against_the_allowed_schemes(key: str) -> None:
    overrides = [f"{key}=ftp://files.example.com/x"]
    if key == "personas.path":
        overrides.append("personas.source=file")
    with pytest.raises(ConfigError) as err:
        build_config({}, overrides)
    assert f"{key} 'ftp://files.example.com/x' is a URL (scheme 'ftp')" in str(err.value)
    assert build_config({}, [*overrides, "run.allowed_schemes=[file, bundled, hf, ftp]"])


def test_the_reference_list_covers_the_references_in_the_config() -> None:
    cfg = build_config(
        {
            "personas": {"source": "file", "path": "p.jsonl"},
            "model": {"adapter": "a"},
            "evaluation": {"original": "o", "judge": {"model": {"path": "j", "adapter": "ja"}}},
            "training": {"accelerate_config": "acc.yaml", "deepspeed": "ds.json"},
        }
    )
    assert isinstance(cfg, RoundConfig)
    assert [key for key, _, _ in cfg.references()] == REFERENCE_KEYS


# --- job templates that do not run as root ------------------------------------------------------------


def _root(user: object) -> bool:
    return str(user).split(":", 1)[0] in ("", "0", "root")


@pytest.mark.parametrize("name", ["docker-gpu.json", "docker-train.json"])
def test_docker_job_templates_run_as_a_non_root_user(name: str) -> None:
    template = json.loads((POOLS / name).read_text())
    kwargs = template["job_configuration"]["container_create_kwargs"]
    assert "user" in kwargs and not _root(kwargs["user"]), (
        f"{name}: container_create_kwargs.user {kwargs.get('user')!r}"
    )
    assert template["variables"]["properties"]["privileged"]["default"] is False


@pytest.mark.parametrize(
    "name",
    ["kubernetes-gpu.json", "kubernetes-train.json"],
)
def test_kubernetes_job_templates_run_as_a_non_root_user(name: str) -> None:
    template = json.loads((POOLS / name).read_text())
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    security = pod.get("securityContext", {})
    assert security.get("runAsNonRoot") is True, f"{name}: pod securityContext {security}"
    assert security.get("runAsUser", 1) != 0
    for container in pod["containers"]:
        own = container.get("securityContext", {})
        assert own.get("allowPrivilegeEscalation") is False, f"{name}: container {container['name']}: {own}"
        assert not own.get("privileged") and own.get("runAsUser", 1) != 0
