"""Which URL schemes a config's references use, and which it may use (SECURITY.md).

    url_schemes("simplecache::s3://b/m", "model")   # ["simplecache", "s3"]
    url_schemes("org/name", "model")                # ["hf"]: a Hugging Face id

Model and data references are checked against run.allowed_schemes (DEFAULT_SCHEMES unless a config
widens it); server base URLs against run.allowed_base_url_schemes (BASE_URL_SCHEMES).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from sao_core.redact import redact

# The schemes a model or data reference may use unless run.allowed_schemes says otherwise (SECURITY.md):
# "file" is a local path, "hf" a Hugging Face id or hf:// URL (a download from the hub), "bundled" a
# model shipped with the packages. Not http(s), ftp, ssh, github: add them to fetch from there on purpose.
DEFAULT_SCHEMES = ("file", "s3", "gs", "memory", "hf", "bundled")
# fsspec's other names for the same stores: allowing one allows its alias.
SCHEME_ALIASES = {"gcs": "gs", "s3a": "s3", "local": "file"}
# The schemes engine.base_urls may use unless run.allowed_base_url_schemes says otherwise: the openai engine
# speaks HTTP, and a served model is usually on the same private network; [https] refuses plain http.
BASE_URL_SCHEMES: tuple[Literal["http", "https"], ...] = ("http", "https")


def check_base_url(key: str, url: str, allowed: tuple[str, ...]) -> None:
    match = _SCHEME_RE.match(url)
    if not match:
        raise ValueError(f"{key} {redact(url)!r} is not a URL: write it as http://HOST:PORT/v1")
    if match.group(1).lower() not in allowed:
        raise ValueError(
            f"{key} {redact(url)!r} uses scheme {match.group(1).lower()!r}, which "
            f"run.allowed_base_url_schemes does not allow (allowed: {', '.join(allowed)})"
        )


# How a reference without a scheme is read: "model" a local folder or else a Hugging Face id (as
# sao_core.store.models resolves it), "dataset" likewise for datasets.load_dataset, "evalset" the keyword
# builtin, hf:DATASET or a file, "data" always a local path, "endpoint" a server's http(s) URL (checked
# against run.allowed_base_url_schemes instead).
RefKind = Literal["model", "dataset", "evalset", "data", "endpoint"]
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_PROTOCOL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*$")


def _is_hub_id(ref: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else with a slash, or a path that exists, is a folder.
    if ref.startswith(("/", "./", "../", "~")) or ref.count("/") > 1:
        return False
    return not Path(ref).expanduser().exists()


def url_schemes(ref: str, kind: RefKind) -> list[str]:
    """The schemes a model or data reference uses (aliases folded: gcs is gs), the way fsspec,
    sao_core.store.models and sao_core.store.evalsets read it; a chained URL (simplecache::s3://...) has several."""
    if kind == "evalset" and ref == "builtin":
        return []
    if ref.startswith("bundled:") and kind == "model":
        return ["bundled"]
    if ref.startswith("hf:") and "://" not in ref and kind == "evalset":
        return ["hf"]
    schemes = []
    parts = ref.split("::")
    for i, part in enumerate(parts):
        match = _SCHEME_RE.match(part)
        if match:
            schemes.append(match.group(1).lower())
        elif i < len(parts) - 1 and _PROTOCOL_RE.match(part):
            schemes.append(part.lower())  # fsspec's "simplecache::s3://..." names a protocol alone
        elif kind in ("model", "dataset") and len(parts) == 1 and _is_hub_id(ref):
            schemes.append("hf")
        else:
            schemes.append("file")
    return [SCHEME_ALIASES.get(s, s) for s in schemes]
