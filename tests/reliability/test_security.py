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
from sao_core.redact import redact
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
    # A short evaluation (8 prompts, 8 trust pairs): every kind of object is still written.
    sets = [f"run.root={root}", "personas.n=4", "evaluation.n=8", "evaluation.trust_n=8"]
    sets = [arg for s in sets for arg in ("--set", s)]
    run = subprocess.run(
        [str(sao), "run", "--config", TINY, *sets],
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
    "evaluation.downstream.include_path",
]
# Engine sections whose base_urls are checked against run.allowed_base_url_schemes instead.
ENGINE_KEYS = ["engine", "evaluation.engine", "evaluation.judge.engine"]


def _reference_overrides(key: str, value: str) -> list[str]:
    """Overrides that put `value` in the reference `key` (base_urls for an engine section)."""
    if key in ENGINE_KEYS:
        return [f"{key}.base_urls=['{value}']", f"{key}.name=transformers"]
    extra = {"personas.path": ["personas.source=file"]}.get(key, [])
    return [f"{key}={value}", *extra]


@pytest.fixture
def lm_eval_includes_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAO_ALLOW_LM_EVAL_INCLUDE", "1")


@pytest.mark.parametrize("key", REFERENCE_KEYS)
def test_every_reference_is_checked_against_the_allowed_schemes(
    key: str, lm_eval_includes_allowed: None
) -> None:
    overrides = _reference_overrides(key, "ftp://files.example.com/x")
    with pytest.raises(ConfigError) as err:
        build_config({}, overrides)
    assert f"{key} 'ftp://files.example.com/x' is a URL (scheme 'ftp')" in str(err.value)
    assert build_config({}, [*overrides, "run.allowed_schemes=[file, bundled, hf, ftp]"])


@pytest.mark.parametrize("key", ENGINE_KEYS)
def test_every_base_url_is_checked_against_the_allowed_base_url_schemes(key: str) -> None:
    assert build_config({}, _reference_overrides(key, "http://gpu-1:8000/v1"))
    for url, scheme in (("ftp://gpu-1/v1", "ftp"), ("file:///tmp/sock", "file")):
        with pytest.raises(ConfigError, match=rf"{key}\.base_urls '{url}' uses scheme '{scheme}'"):
            build_config(
                {}, [*_reference_overrides(key, url), f"run.allowed_schemes=[{scheme}, file, bundled, hf]"]
            )
    # Allowing http for servers does not allow it for data, and https only refuses plain http.
    with pytest.raises(ConfigError, match=r"personas.path 'http://h/p.jsonl' is a URL"):
        build_config(
            {},
            [
                *_reference_overrides(key, "http://h/v1"),
                "personas.source=file",
                "personas.path=http://h/p.jsonl",
            ],
        )
    with pytest.raises(ConfigError, match=rf"{key}\.base_urls 'http://h/v1' uses scheme 'http'"):
        build_config({}, [*_reference_overrides(key, "http://h/v1"), "run.allowed_base_url_schemes=[https]"])
    assert build_config(
        {}, [*_reference_overrides(key, "https://h/v1"), "run.allowed_base_url_schemes=[https]"]
    )
    with pytest.raises(ConfigError, match=rf"{key}\.base_urls 'gpu-1:8000' is not a URL"):
        build_config({}, _reference_overrides(key, "gpu-1:8000"))


def test_the_reference_list_covers_the_references_in_the_config(lm_eval_includes_allowed: None) -> None:
    cfg = build_config(
        {
            "personas": {"source": "file", "path": "p.jsonl"},
            "model": {"adapter": "a"},
            "evaluation": {
                "original": "o",
                "judge": {"model": {"path": "j", "adapter": "ja"}, "engine": {"base_urls": ["http://j/v1"]}},
                "downstream": {"include_path": "tasks"},
                "engine": {"base_urls": ["http://e/v1"]},
            },
            "training": {"accelerate_config": "acc.yaml", "deepspeed": "ds.json"},
            "engine": {"base_urls": ["http://a/v1", "http://b/v1"]},
        }
    )
    assert isinstance(cfg, RoundConfig)
    endpoints = ["engine", "engine", "evaluation.engine", "evaluation.judge.engine"]
    assert [key for key, _, _ in cfg.references()] == REFERENCE_KEYS + [f"{k}.base_urls" for k in endpoints]


# --- no credential in a URL: refused by the config, redacted wherever an error shows it -------------------

URL_SENTINEL = "SENTINELurlsecret51c2"


@pytest.mark.parametrize("key", REFERENCE_KEYS + ENGINE_KEYS)
@pytest.mark.parametrize(
    ("value", "shown", "credential"),
    [
        (f"s3://AKIAEXAMPLE:{URL_SENTINEL}@bucket/x", "s3://***@bucket/x", "user-info"),
        (
            f"https://host/x?X-Amz-Signature={URL_SENTINEL}&X-Amz-Expires=60",
            "https://host/x?X-Amz-Signature=***",
            "query parameter 'X-Amz-Signature'",
        ),
        (f"simplecache::gs://user:{URL_SENTINEL}@b/x", "simplecache::gs://***@b/x", "user-info"),
        (
            f"http://h:8000/v1?api_key={URL_SENTINEL}",
            "http://h:8000/v1?api_key=***",
            "query parameter 'api_key'",
        ),
    ],
    ids=["user-info", "presigned", "chained", "api-key-query"],
)
def test_a_credential_in_any_url_of_a_config_is_refused_and_never_shown(
    key: str, value: str, shown: str, credential: str, tmp_path: Path, lm_eval_includes_allowed: None
) -> None:
    import traceback

    from sao_core.store.layout import load_config

    recipe = tmp_path / "round.yaml"
    recipe.write_text("run: {campaign: c}\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(recipe), _reference_overrides(key, value))
    message = str(err.value)
    assert f"'{shown}" in message and f"carries a credential in its URL ({credential}" in message
    # Not in the error, nor in what it was raised from (a traceback prints the causes).
    assert URL_SENTINEL not in "".join(traceback.format_exception(err.value))


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        ("s3://AKIA:secret@bucket/key", "s3://***@bucket/key"),
        ("at http://user:p%40ss@host:8000/v1 and s3://b/k@v1", "at http://***@host:8000/v1 and s3://b/k@v1"),
        (
            "https://a.blob.core.windows.net/c/f?sv=2022&sig=abc%3D&se=x",
            "https://a.blob.core.windows.net/c/f?sv=***&sig=***&se=***",
        ),
        ("'simplecache::s3://k:s@b/x'", "'simplecache::s3://***@b/x'"),
        ("http://[::1]:8000/v1?token=t", "http://[::1]:8000/v1?token=***"),
        ("Authorization: Bearer sk-123", "Authorization: Bearer ***"),
        ("no url here: user:pass@host", "no url here: user:pass@host"),
        ("https://host/path?", "https://host/path?"),
    ],
)
def test_redact_hides_user_info_query_values_and_bearer_tokens(text: str, redacted: str) -> None:
    assert redact(text) == redacted


def test_a_refused_credential_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    root = tmp_path / "rounds"
    code = main(
        [
            "synth",
            "--config",
            TINY,
            "--set",
            f"run.root={root}",
            "--set",
            f"model.path=s3://k:{URL_SENTINEL}@b/m",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 2 and URL_SENTINEL not in out + err
    assert not root.exists()  # no round folder, resolved config, manifest or report


# --- which secrets a config may send, and which Python it may load: the worker decides -----------------


def test_the_issue_reproduction_an_openai_round_cannot_send_the_aws_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SAO_ALLOWED_KEY_ENVS", raising=False)
    openai = ["engine.name=openai", "engine.base_urls=[http://host]", "evaluation.enabled=false"]
    with pytest.raises(
        ConfigError,
        match=r"'engine\.api_key_env': Value error, 'AWS_SECRET_ACCESS_KEY' is not a key this worker hands out",
    ):
        build_config({}, [*openai, "engine.api_key_env=AWS_SECRET_ACCESS_KEY"])
    for name in ("HF_TOKEN", "GITHUB_TOKEN", "POSTGRES_PASSWORD", "AWS_SESSION_TOKEN", "PATH"):
        with pytest.raises(ConfigError, match=f"'{name}' is not a key"):
            build_config({}, [*openai, f"engine.api_key_env={name}"])
    assert build_config({}, [*openai, "engine.api_key_env=VLLM_API_KEY"]).engine.api_key_env == "VLLM_API_KEY"
    # Nothing in a config can widen it.
    with pytest.raises(ConfigError, match=r"unknown config key 'engine.allowed_key_envs'"):
        build_config({}, [*openai, "engine.allowed_key_envs=['*']"])


@pytest.mark.parametrize(
    ("allowed", "name", "ok"),
    [
        (None, "OPENAI_API_KEY", True),
        (None, "AWS_SECRET_ACCESS_KEY", False),
        ("OPENAI_API_KEY", "OPENAI_API_KEY", True),
        ("OPENAI_API_KEY", "OTHER_API_KEY", False),  # narrowed to one
        ("*_API_KEY, VLLM_TOKEN", "VLLM_TOKEN", True),  # widened
        ("", "OPENAI_API_KEY", False),  # no key at all
        ("*", "bad name", False),
    ],
)
def test_the_workers_environment_decides_which_keys_a_config_may_name(
    monkeypatch: pytest.MonkeyPatch, allowed: str | None, name: str, ok: bool
) -> None:
    from sao_core.config.worker_env import key_env_problem

    if allowed is None:
        monkeypatch.delenv("SAO_ALLOWED_KEY_ENVS", raising=False)
    else:
        monkeypatch.setenv("SAO_ALLOWED_KEY_ENVS", allowed)
    assert (key_env_problem(name) is None) is ok
    # A local engine sends no key: an operator who allows none can still run one.
    assert build_config({}, [f"engine.api_key_env={name.replace(' ', '_')}"])


def test_the_openai_engine_checks_the_key_where_it_reads_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from sao_core.config import EngineConfig
    from sao_core.engines.openai import OpenAIEngine

    monkeypatch.setenv("SAO_ALLOWED_KEY_ENVS", "*")  # where the config was built
    engine = EngineConfig(
        name="openai", base_urls=("http://127.0.0.1:9/v1",), api_key_env="AWS_SECRET_ACCESS_KEY"
    )
    monkeypatch.delenv("SAO_ALLOWED_KEY_ENVS")  # the worker that runs it
    with pytest.raises(ConfigError, match=r"engine.api_key_env: 'AWS_SECRET_ACCESS_KEY' is not a key"):
        OpenAIEngine(engine, ModelConfig(path="m"))


def test_lm_eval_include_paths_are_off_unless_the_worker_allows_them(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("SAO_ALLOW_LM_EVAL_INCLUDE", raising=False)
    include = [f"evaluation.downstream.include_path={tmp_path}"]
    with pytest.raises(
        ConfigError, match=r"'evaluation.downstream.include_path': .*SAO_ALLOW_LM_EVAL_INCLUDE=1"
    ):
        build_config({}, include)
    monkeypatch.setenv("SAO_ALLOW_LM_EVAL_INCLUDE", "1")
    assert build_config({}, include).evaluation.downstream.include_path == str(tmp_path)
    with pytest.raises(ConfigError, match=r"evaluation.downstream.include_path 'github://\*\*\*@/t' carries"):
        build_config({}, ["evaluation.downstream.include_path=github://org:repo@/t"])


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
