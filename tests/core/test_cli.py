import subprocess
import sys
from pathlib import Path

from sao_core.cli import main

ROOT = Path(__file__).parents[2]


def test_synth_prints_the_round_folder_and_stage_summary(tmp_path, capsys):
    code = main(
        [
            "synth",
            "--config",
            str(ROOT / "configs/tiny.yaml"),
            "--set",
            "engine.name=fake",
            "--set",
            f"run.root={tmp_path}",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert f"round folder: {tmp_path}/tiny/round_001-" in out
    for stage in ("personas", "prompts", "responses", "judgements", "pairs"):
        assert stage in out
    assert "judge: parse rate" in out and "repetition rate" in out


def test_bad_key_exits_2_with_the_key_named(tmp_path, capsys):
    code = main(["synth", "--config", str(ROOT / "configs/tiny.yaml"), "--set", "judging.swapp=true"])
    err = capsys.readouterr().err
    assert code == 2
    assert "unknown config key 'judging.swapp'" in err and "did you mean 'judging.swap'" in err


def test_missing_model_path_is_named(tmp_path, capsys):
    missing = tmp_path / "no" / "such-model"
    code = main(
        [
            "synth",
            "--config",
            str(ROOT / "configs/tiny.yaml"),
            "--set",
            f"model.path={missing}",
            "--set",
            "engine.name=transformers",
            "--set",
            f"run.root={tmp_path}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and f"model path '{missing}' does not exist" in err


def test_console_script_is_installed():
    out = subprocess.run(
        [sys.executable, "-m", "sao_core.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "synth" in out.stdout


def test_import_sao_core_is_light_and_never_imports_prefect():
    code = (
        "import sys, sao_core, sao_core.config, sao_core.stages, sao_core.pipeline, sao_core.cli, sao_core.personas;"
        "heavy = [m for m in ('torch', 'transformers', 'datasets', 'prefect', 'vllm', 'trl') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_no_module_in_sao_core_imports_prefect():
    for path in (ROOT / "sao_core").rglob("*.py"):
        text = path.read_text()
        assert "import prefect" not in text and "from prefect" not in text, path
