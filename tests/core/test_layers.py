"""The import contracts of pyproject.toml ([tool.importlinter], run by `make lint`) hold, and they catch
what they are meant to: each test plants one wrong import in a copy of the code and expects
`lint-imports` to fail naming the broken contract."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("sao_core", "tasks", "flows")


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "lint-imports"
    assert exe.is_file(), f"{exe} is missing: import-linter is in the dev extras (make setup)"
    # The copy comes first on the path, ahead of the editable install of the checkout.
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run(
        [str(exe), "--no-cache", "--config", str(cwd / "pyproject.toml")],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def _plant(tree: Path, module: str, line: str) -> None:
    """Add an import inside a function, where a linter reading only the top of a file would miss it."""
    path = tree / module
    path.write_text(path.read_text() + f"\n\ndef _planted() -> None:\n    {line}\n")


def test_the_checkout_keeps_every_contract(tree: Path) -> None:
    out = _lint_imports(tree)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "0 broken" in out.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("sao_core/cli_planted.py", "from flows.cli import main  # noqa", "Layers"),
        ("sao_core/store/storage.py", "import tasks.cache  # noqa", "Layers"),
        ("tasks/cache.py", "import flows.sao_round  # noqa", "Layers"),
        ("sao_core/stages/synth.py", "import prefect  # noqa", "sao_core never imports prefect"),
        ("sao_core/engines/vllm.py", "import vllm  # noqa", "only sao_core.engines.vllm_worker"),
        ("sao_core/engines/openai.py", "from sao_core.stages import runner  # noqa", "Engines run requests"),
        (
            "sao_core/engines/fake.py",
            "from sao_core.evaluation import compare  # noqa",
            "Engines run requests",
        ),
        ("sao_core/method/judging.py", "from sao_core.store import storage  # noqa", "The method is pure"),
        (
            "sao_core/method/prompts.py",
            "from sao_core.engines import make_engine  # noqa",
            "The method is pure",
        ),
        ("sao_core/method/pairing.py", "import fsspec  # noqa", "The method is pure"),
        (
            "sao_core/stages/runner.py",
            "from sao_core.evaluation import winrate  # noqa",
            "Campaign above evaluation",
        ),
        (
            "sao_core/evaluation/compare.py",
            "from sao_core.campaign import ledger  # noqa",
            "Campaign above evaluation",
        ),
        ("sao_core/store/layout.py", "from sao_core.stages import runner  # noqa", "The store is the bottom"),
        (
            "sao_core/store/models.py",
            "from sao_core.testing import build_tiny_llama  # noqa",
            "sao_core.testing",
        ),
        ("sao_core/config/loading.py", "from sao_core.store import layout  # noqa", "No import cycles"),
    ],
)
def test_a_wrong_way_import_breaks_its_contract(tree: Path, module: str, line: str, contract: str) -> None:
    if not (tree / module).exists():
        (tree / module).write_text('"""A module planted by the test."""\n')
    _plant(tree, module, line)
    out = _lint_imports(tree)
    assert out.returncode != 0, out.stdout[-3000:]
    assert "Broken contracts" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
    broken = out.stdout.split("Broken contracts", 1)[1]
    assert contract in broken, out.stdout[-3000:]
