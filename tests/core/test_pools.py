"""The work pools' base job templates (deployments/pools/), checked without a server: each parses, declares
every variable its job configuration uses, keeps Prefect's default template, renders its GPU request as an
integer the way a worker templates it, and names the images docker/README.md builds.

    .venv/bin/python -m pytest -q tests/core/test_pools.py
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
from prefect.utilities.templating import PlaceholderType, apply_values, find_placeholders

REPO = Path(__file__).resolve().parents[2]
POOLS = REPO / "deployments" / "pools"
TEMPLATE_FILES = sorted(POOLS.glob("*.json"))
DOCKER_TEMPLATES = ("docker-gpu.json", "docker-train.json")
KUBERNETES_TEMPLATES = ("kubernetes-gpu.json", "kubernetes-train.json")
GPU_TEMPLATES = DOCKER_TEMPLATES + KUBERNETES_TEMPLATES
# Which image each GPU template runs, by the Dockerfile that builds it.
IMAGE_OF = {
    "docker-gpu.json": "vllm-worker.Dockerfile",
    "kubernetes-gpu.json": "vllm-worker.Dockerfile",
    "docker-train.json": "trainer.Dockerfile",
    "kubernetes-train.json": "trainer.Dockerfile",
}
SECRET_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "HF_TOKEN",
    "PREFECT_API_KEY",
)


def load(name: str) -> dict[str, Any]:
    return json.loads((POOLS / name).read_text())


def prefect_default(pool_type: str) -> dict[str, Any]:
    """Prefect's own default base job template for `pool_type`, as `prefect work-pool
    get-default-base-job-template --type T` gives it offline (the registry copy shipped with prefect)."""
    import prefect.server.api

    views = Path(prefect.server.api.__file__).parent / "collections_data" / "views"
    registry = json.loads((views / "aggregate-worker-metadata.json").read_text())
    for workers in registry.values():
        for worker in workers.values():
            if worker["type"] == pool_type:
                return worker["default_base_job_configuration"]
    raise AssertionError(f"prefect ships no default template for {pool_type!r}")


def render(template: dict[str, Any], values: dict[str, Any] | None = None) -> dict[str, Any]:
    """The job configuration a worker builds for a flow run: variable defaults (None ones dropped),
    overridden by the run's job variables, `env` merged, then Prefect's templating
    (BaseJobConfiguration.from_template_and_values, without the server round trips)."""
    values = values or {}
    config = copy.deepcopy(template["job_configuration"])
    variables = {
        name: schema["default"]
        for name, schema in template["variables"]["properties"].items()
        if schema.get("default") is not None
    }
    if variables.get("env"):
        config["env"] = variables["env"]
    variables.update(values)
    if isinstance(config.get("env"), dict) and values.get("env"):
        config["env"] = config["env"] | values["env"]
    return apply_values(config, variables)


def pod_spec(config: dict[str, Any]) -> dict[str, Any]:
    return config["job_manifest"]["spec"]["template"]["spec"]


def built_images() -> dict[str, str]:
    """Dockerfile -> image name, from the `docker build -f docker/X -t NAME .` lines of docker/README.md."""
    text = (REPO / "docker" / "README.md").read_text()
    images = dict(re.findall(r"docker build -f docker/(\S+) -t (\S+) \.", text))
    assert images, "docker/README.md lists no `docker build -f docker/... -t NAME .` command"
    return images


def test_the_pool_templates_sao_deploy_names_exist() -> None:
    from flows.deploy import TEMPLATES

    missing = sorted({file for file in TEMPLATES.values() if not (POOLS / file).is_file()})
    assert not missing, f"sao deploy names templates that deployments/pools/ lacks: {missing}"
    assert {path.name for path in TEMPLATE_FILES} == set(TEMPLATES.values())


@pytest.mark.parametrize("path", TEMPLATE_FILES, ids=lambda p: p.name)
def test_template_parses_and_has_both_parts(path: Path) -> None:
    template = json.loads(path.read_text())
    assert isinstance(template.get("job_configuration"), dict) and template["job_configuration"]
    assert isinstance(template.get("variables"), dict)
    assert isinstance(template["variables"].get("properties"), dict) and template["variables"]["properties"]


@pytest.mark.parametrize("path", TEMPLATE_FILES, ids=lambda p: p.name)
def test_every_placeholder_is_a_declared_variable(path: Path) -> None:
    from prefect.server.schemas.actions import validate_base_job_template

    template = json.loads(path.read_text())
    placeholders = find_placeholders(template["job_configuration"])
    declared = set(template["variables"]["properties"])
    undeclared = sorted(p.name for p in placeholders if p.name not in declared)
    assert not undeclared, f"{path.name}: job_configuration uses undeclared variables {undeclared}"
    assert {p.type for p in placeholders} == {PlaceholderType.STANDARD}
    validate_base_job_template(template)  # the server's own check at `prefect work-pool create`


@pytest.mark.parametrize("path", TEMPLATE_FILES, ids=lambda p: p.name)
def test_defaults_fit_their_schemas(path: Path) -> None:
    from prefect.utilities.schema_tools.validation import validate

    template = json.loads(path.read_text())
    schema = template["variables"]
    for name, variable in schema["properties"].items():
        if "default" in variable:
            # What the server runs on a pool's defaults before it accepts the template.
            validate(
                {name: variable["default"]},
                schema,
                raise_on_error=True,
                preprocess=False,
                ignore_required=True,
            )


@pytest.mark.parametrize(
    ("name", "pool_type"),
    [
        ("process.json", "process"),
        *((name, "docker") for name in DOCKER_TEMPLATES),
        *((name, "kubernetes") for name in KUBERNETES_TEMPLATES),
    ],
)
def test_prefect_defaults_are_kept(name: str, pool_type: str) -> None:
    ours, default = load(name), prefect_default(pool_type)
    dropped = sorted(set(default["variables"]["properties"]) - set(ours["variables"]["properties"]))
    assert not dropped, f"{name} drops Prefect's default variables {dropped}"
    for key, value in default["job_configuration"].items():
        if key != "job_manifest":
            assert ours["job_configuration"][key] == value, f"{name}: job_configuration.{key} changed"
    default_variables = find_placeholders(default["job_configuration"])
    assert default_variables <= find_placeholders(ours["job_configuration"])


@pytest.mark.parametrize("name", GPU_TEMPLATES)
def test_gpu_count_is_an_integer_variable(name: str) -> None:
    gpu_count = load(name)["variables"]["properties"]["gpu_count"]
    assert gpu_count["type"] == "integer"
    assert type(gpu_count["default"]) is int and gpu_count["default"] >= 1


@pytest.mark.parametrize("name", DOCKER_TEMPLATES)
def test_docker_templates_request_gpus(name: str) -> None:
    template = load(name)
    kwargs = template["job_configuration"]["container_create_kwargs"]
    assert kwargs["device_requests"] == [
        {"driver": "nvidia", "count": "{{ gpu_count }}", "capabilities": [["gpu"]]}
    ]
    assert kwargs["shm_size"] == "{{ shm_size }}"
    # The images' health check asks a worker's webserver, which a flow-run container does not start.
    assert kwargs["healthcheck"] == {"test": ["NONE"]}

    default = template["variables"]["properties"]["gpu_count"]["default"]
    rendered = render(template)["container_create_kwargs"]
    assert rendered["device_requests"][0]["count"] == default
    assert type(rendered["device_requests"][0]["count"]) is int
    assert rendered["shm_size"] == template["variables"]["properties"]["shm_size"]["default"]
    override = render(template, {"gpu_count": 3})["container_create_kwargs"]["device_requests"][0]
    assert override["count"] == 3 and type(override["count"]) is int


@pytest.mark.parametrize("name", KUBERNETES_TEMPLATES)
def test_kubernetes_templates_request_gpus(name: str) -> None:
    template = load(name)
    container = pod_spec(template["job_configuration"])["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "{{ gpu_count }}"

    default = template["variables"]["properties"]["gpu_count"]["default"]
    resources = pod_spec(render(template))["containers"][0]["resources"]
    assert resources == {"limits": {"nvidia.com/gpu": default}, "requests": {"nvidia.com/gpu": default}}
    resources = pod_spec(render(template, {"gpu_count": 2, "cpu_limit": "8"}))["containers"][0]["resources"]
    assert resources["limits"] == {"cpu": "8", "nvidia.com/gpu": 2}
    assert type(resources["requests"]["nvidia.com/gpu"]) is int


@pytest.mark.parametrize("name", KUBERNETES_TEMPLATES)
def test_kubernetes_node_selector_and_tolerations_are_optional(name: str) -> None:
    template = load(name)
    variables = template["variables"]["properties"]
    assert variables["node_selector"]["type"] == "object" and "default" not in variables["node_selector"]
    assert variables["tolerations"]["type"] == "array" and "default" not in variables["tolerations"]

    spec = pod_spec(render(template))
    assert "nodeSelector" not in spec and "tolerations" not in spec
    selector = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    tolerations = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    spec = pod_spec(render(template, {"node_selector": selector, "tolerations": tolerations}))
    assert spec["nodeSelector"] == selector
    assert spec["tolerations"] == tolerations
    # /dev/shm for vLLM's processes and NCCL: an in-memory volume of shm_size.
    assert {"name": "dshm", "mountPath": "/dev/shm"} in spec["containers"][0]["volumeMounts"]
    dshm = next(v for v in spec["volumes"] if v["name"] == "dshm")
    assert dshm["emptyDir"] == {"medium": "Memory", "sizeLimit": variables["shm_size"]["default"]}


@pytest.mark.parametrize("name", GPU_TEMPLATES)
def test_images_default_to_the_built_ones(name: str) -> None:
    image = load(name)["variables"]["properties"]["image"]["default"]
    assert image == built_images()[IMAGE_OF[name]]


def test_training_templates_differ_only_in_image_and_gpus() -> None:
    def essentials(template: dict[str, Any]) -> dict[str, Any]:
        template = copy.deepcopy(template)
        for variable in template["variables"]["properties"].values():
            variable.pop("description", None)
        for key in ("image", "gpu_count"):
            template["variables"]["properties"][key].pop("default")
        return template

    for kind in ("docker", "kubernetes"):
        batch, train = load(f"{kind}-gpu.json"), load(f"{kind}-train.json")
        assert essentials(batch) == essentials(train), f"{kind}-train.json drifted from {kind}-gpu.json"
        gpus = {t["variables"]["properties"]["gpu_count"]["default"] for t in (batch, train)}
        assert train["variables"]["properties"]["gpu_count"]["default"] == max(gpus) > 1


@pytest.mark.parametrize("path", TEMPLATE_FILES, ids=lambda p: p.name)
def test_no_credentials_in_templates(path: Path) -> None:
    env = json.loads(path.read_text())["variables"]["properties"]["env"].get("default", {})
    for key in SECRET_ENV:
        if key in env:
            assert env[key] == f"{{{{ ${key} }}}}", (
                f"{path.name}: {key} must come from the worker's environment"
            )


@pytest.mark.parametrize("name", DOCKER_TEMPLATES)
def test_docker_runs_get_credentials_from_the_worker(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDWORKER")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "from-the-worker")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    env = render(load(name), {"env": {"AWS_DEFAULT_REGION": "eu-west-1"}})["env"]
    assert env["AWS_ACCESS_KEY_ID"] == "AKIDWORKER"
    assert env["AWS_SECRET_ACCESS_KEY"] == "from-the-worker"
    assert env["AWS_ENDPOINT_URL"] == ""  # unset on the worker: empty, which botocore reads as unset
    assert env["AWS_DEFAULT_REGION"] == "eu-west-1"  # a run's own env is merged on top
    assert env["SAO_PROJECT_DIR"] == "/opt/sao"


def test_process_template_keeps_the_workers_environment_settings() -> None:
    env = render(load("process.json"))["env"]
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    # CUDA_VISIBLE_DEVICES comes from each worker's environment: the pool must not pin it.
    assert "CUDA_VISIBLE_DEVICES" not in env
