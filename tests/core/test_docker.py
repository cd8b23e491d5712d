"""The images and the local stack (docker/), checked without a Docker daemon: the compose file, what the
Dockerfiles copy, the pinned requirements against pyproject.toml, the user the images run as, committed
secrets, and hadolint.

    .venv/bin/python -m pytest -q tests/core/test_docker.py
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
ENV_EXAMPLE = DOCKER / ".env.example"

SECRET_KEYS = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_ACCESS_KEY_ID",
    "AWS_SESSION_TOKEN",
    "POSTGRES_PASSWORD",
    "PREFECT_API_KEY",
    "OPENAI_API_KEY",
    "HF_TOKEN",
)
PLACEHOLDERS = {"", "change-me"}


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def instructions(dockerfile: Path) -> list[tuple[int, str, str]]:
    """(first line, INSTRUCTION, arguments) of each instruction, continuation lines joined, comments dropped."""
    out: list[tuple[int, str, str]] = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(dockerfile.read_text().splitlines(), start=1):
        line = raw.strip()
        if not parts and (not line or line.startswith("#")):
            continue
        if parts and line.startswith("#"):  # a comment inside a continued instruction
            continue
        if not parts:
            start = number
        parts.append(line[:-1] if line.endswith("\\") else line)
        if not line.endswith("\\"):
            keyword, _, args = " ".join(parts).partition(" ")
            out.append((start, keyword.upper(), args.strip()))
            parts = []
    return out


def copy_sources(dockerfile: Path) -> list[tuple[int, str]]:
    """(line, source) of every COPY/ADD from the build context; copies from another stage are skipped."""
    out = []
    for number, keyword, args in instructions(dockerfile):
        if keyword not in ("COPY", "ADD"):
            continue
        words = json.loads(args) if args.startswith("[") else args.split()
        flags = [w for w in words if w.startswith("--")]
        if any(flag.startswith("--from=") for flag in flags):
            continue
        paths = [w for w in words if not w.startswith("--")]
        out += [(number, source) for source in paths[:-1]]
    return out


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip().rstrip("/") for line in lines if line.strip() and not line.startswith(("#", "!"))]


def ignored_by_dockerignore(source: str, patterns: list[str]) -> str | None:
    """The .dockerignore pattern that leaves `source` (or a folder above it) out of the build context."""
    parts = Path(source.rstrip("/")).parts
    for i in range(1, len(parts) + 1):
        prefix = "/".join(parts[:i])
        for pattern in patterns:
            if fnmatch.fnmatchcase(prefix, pattern) or (
                pattern.startswith("**/") and fnmatch.fnmatchcase(parts[i - 1], pattern[3:])
            ):
                return pattern
    return None


def compose_lines() -> dict[str, int]:
    """The line of each service in compose.yaml (PyYAML's plain load keeps no positions)."""
    root = yaml.compose(COMPOSE.read_text())
    assert isinstance(root, yaml.MappingNode), f"{rel(COMPOSE)}:1: not a mapping"
    for key, value in root.value:
        if key.value == "services":
            return {k.value: k.start_mark.line + 1 for k, _ in value.value}
    raise AssertionError(f"{rel(COMPOSE)}: no services")


def load_compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_the_three_images_exist():
    names = [path.name for path in DOCKERFILES]
    wanted = ["orchestrator.Dockerfile", "trainer.Dockerfile", "vllm-worker.Dockerfile"]
    assert names == wanted, f"docker/: has {names}, wants {wanted}"


def test_compose_parses_and_every_build_names_an_existing_dockerfile():
    services = load_compose()["services"]
    lines = compose_lines()
    built = set()
    for name, service in services.items():
        where = f"{rel(COMPOSE)}:{lines[name]} (service {name})"
        assert "image" in service or "build" in service, f"{where}: neither image nor build"
        if "build" not in service:
            assert re.search(r":[\w.-]+$", service["image"]), (
                f"{where}: image {service['image']!r} has no tag"
            )
            assert not service["image"].endswith(":latest"), f"{where}: image pinned to latest"
            continue
        context = (DOCKER / service["build"]["context"]).resolve()
        assert context == REPO, f"{where}: build context {context} is not the repository root"
        dockerfile = context / service["build"]["dockerfile"]
        assert dockerfile.is_file(), f"{where}: build.dockerfile {dockerfile} does not exist"
        built.add(dockerfile)
    assert built == set(DOCKERFILES), f"{rel(COMPOSE)}: builds {sorted(map(rel, built))}"


def test_compose_pools_and_gpu_reservations():
    services = load_compose()["services"]
    lines = compose_lines()
    pools = {"orchestrator": "sao-cpu", "gpu-batch": "sao-gpu-batch", "trainer": "sao-train"}
    for name, pool in pools.items():
        dockerfile = DOCKER / services[name]["build"]["dockerfile"].removeprefix("docker/")
        cmd = next(json.loads(args) for _, kw, args in instructions(dockerfile) if kw == "CMD")
        assert cmd[cmd.index("--pool") + 1] == pool, f"{rel(dockerfile)}: CMD {cmd} is not on pool {pool}"
        api = services[name]["environment"]["PREFECT_API_URL"]
        assert api == "http://prefect-server:4200/api", (
            f"{rel(COMPOSE)}:{lines[name]} (service {name}): {api}"
        )
    for name, count in (("gpu-batch", 1), ("trainer", "all")):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": count, "capabilities": ["gpu"]}], (
            f"{rel(COMPOSE)}:{lines[name]} (service {name}): GPU reservation {devices}"
        )
    server = services["prefect-server"]["environment"]
    where = f"{rel(COMPOSE)}:{lines['prefect-server']} (service prefect-server)"
    assert server["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://"), where
    leases = server["PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE"]
    assert leases == "prefect.server.concurrency.lease_storage.filesystem", f"{where}: {leases}"


def test_every_file_compose_mounts_from_the_repository_exists():
    services = load_compose()["services"]
    lines = compose_lines()
    mounts = 0
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0] if isinstance(volume, str) else volume.get("source", "")
            if not source.startswith((".", "/")):
                continue  # a named volume
            path = (DOCKER / source).resolve()
            where = f"{rel(COMPOSE)}:{lines[name]} (service {name})"
            assert path.is_relative_to(REPO), f"{where}: mounts {source}, outside the repository"
            assert path.exists(), f"{where}: mounts {source}, which does not exist"
            mounts += 1
    assert mounts, "no bind mounts found: the parser above no longer reads compose.yaml's volumes"


def test_every_required_compose_variable_is_in_the_env_example():
    example = {
        line.split("=", 1)[0] for line in ENV_EXAMPLE.read_text().splitlines() if re.match(r"^\w+=", line)
    }
    for number, line in enumerate(COMPOSE.read_text().splitlines(), start=1):
        for variable in re.findall(r"\$\{(\w+):\?", line):
            assert variable in example, (
                f"{rel(COMPOSE)}:{number}: ${variable} is required but not in {rel(ENV_EXAMPLE)}"
            )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_copy_source_exists_and_reaches_the_build_context(dockerfile: Path):
    patterns = dockerignore_patterns()
    sources = copy_sources(dockerfile)
    assert sources, f"{rel(dockerfile)}: no COPY found"
    for number, source in sources:
        where = f"{rel(dockerfile)}:{number}"
        assert (REPO / source).exists(), f"{where}: COPY source {source} does not exist"
        pattern = ignored_by_dockerignore(source, patterns)
        assert pattern is None, f"{where}: COPY source {source} is excluded by .dockerignore's {pattern!r}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_image_runs_as_a_non_root_user(dockerfile: Path):
    steps = instructions(dockerfile)
    last_from = max(i for i, (_, kw, _) in enumerate(steps) if kw == "FROM")
    users = [(number, args) for number, kw, args in steps[last_from:] if kw == "USER"]
    assert users, f"{rel(dockerfile)}: the final stage has no USER, so it runs as root"
    number, user = users[-1]
    name = user.split(":", 1)[0]
    assert name not in ("root", "0"), f"{rel(dockerfile)}:{number}: USER {user} is root"
    env = " ".join(args for _, kw, args in steps if kw == "ENV")
    for setting in ("PYTHONUNBUFFERED=1", "PREFECT_SERVER_ANALYTICS_ENABLED=false", "HOME=/home/sao"):
        assert setting in env, f"{rel(dockerfile)}: ENV does not set {setting}"


def test_requirements_match_pyproject():
    check = load_check()
    problems = check.check()
    assert not problems, "\n".join(problems)


def test_requirements_check_names_the_drifted_line(tmp_path: Path):
    check = load_check()
    for path in (DOCKER / "requirements").glob("*.txt"):
        shutil.copy(path, tmp_path / path.name)
    main = tmp_path / "main.txt"
    lines = main.read_text().splitlines()
    number = next(i for i, line in enumerate(lines, start=1) if line.startswith("trl=="))
    lines[number - 1] = "trl==0.0.1"
    main.write_text("\n".join(lines) + "\n")
    (tmp_path / "vllm.txt").write_text("vllm==0.33.0\ntorch==2.14.0\npydantic==1.0\n")
    problems = check.check(tmp_path)
    assert any(p.startswith(f"{main}:{number}: trl==0.0.1") for p in problems), problems
    assert any(p.startswith(f"{tmp_path / 'vllm.txt'}:3: pydantic==1.0") for p in problems), problems


def load_check():
    spec = importlib.util.spec_from_file_location(
        "docker_requirements_check", DOCKER / "requirements" / "check.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def committed_files() -> list[Path]:
    """Files git tracks or would add (ignored ones, such as docker/.env, left out)."""
    found = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return [REPO / name for name in found.stdout.split("\0") if name and (REPO / name).is_file()]


def looks_like_a_real_secret(value: str) -> bool:
    if value in PLACEHOLDERS or value.startswith("$"):
        return False
    if re.fullmatch(r"(AKIA|ASIA)[A-Z0-9]{16}", value):
        return True
    return len(value) >= 16 and bool(re.search(r"\d", value)) and bool(re.search(r"[A-Za-z]", value))


def test_no_credentials_are_committed():
    assert "docker/.env" in (REPO / ".gitignore").read_text().splitlines(), ".gitignore: add docker/.env"
    assignment = re.compile(r"\b(" + "|".join(SECRET_KEYS) + r")\b[\"']?\s*[:=,]\s*[\"']?([^\s\"'#,)]*)")
    key_id = re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b")
    for path in committed_files():
        if path.stat().st_size > 1_000_000:
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            where = f"{rel(path)}:{number}"
            assert not key_id.search(line), f"{where}: an AWS access key id is committed"
            for key, value in assignment.findall(line):
                if path == ENV_EXAMPLE:
                    assert value in PLACEHOLDERS, (
                        f"{where}: {key} must be a placeholder ({sorted(PLACEHOLDERS)})"
                    )
                else:
                    assert not looks_like_a_real_secret(value), f"{where}: {key} looks like a real value"


def test_compose_takes_secrets_from_the_environment_only():
    services = load_compose()["services"]
    lines = compose_lines()
    for name, service in services.items():
        for key, value in (service.get("environment") or {}).items():
            if key in SECRET_KEYS:
                assert str(value).startswith("${"), (
                    f"{rel(COMPOSE)}:{lines[name]} (service {name}): {key} is not taken from docker/.env"
                )


def test_hadolint_passes_on_every_dockerfile():
    hadolint = Path(sys.executable).parent / "hadolint"
    if not hadolint.exists():
        pytest.fail(f"{hadolint} is missing: install the dev extras (.venv/bin/pip install -e '.[dev]')")
    result = subprocess.run(
        [str(hadolint), "--no-color", *map(rel, DOCKERFILES)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = f"{result.stdout}{result.stderr}"
    assert result.returncode == 0, f"hadolint exited {result.returncode} (FILE:LINE RULE):\n{report}"
