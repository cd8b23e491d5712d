"""What a round's config may ask of the machine that runs it: decided by that machine's environment.

    key_env_problem("AWS_SECRET_ACCESS_KEY")   # "... not a key this worker hands out ..."
    lm_eval_includes_allowed()                 # False unless SAO_ALLOW_LM_EVAL_INCLUDE=1

Whoever can trigger a round writes its config (SECURITY.md), so a config must not choose which of the
worker's secrets leave the machine, nor make it run Python it brought along. The operator decides, in
the worker's environment:

- SAO_ALLOWED_KEY_ENVS: the environment variables `engine.api_key_env` may name, comma-separated names
  or shell patterns (`OPENAI_API_KEY`, `*_API_KEY,VLLM_TOKEN`); it replaces the default `*_API_KEY`.
- SAO_ALLOW_LM_EVAL_INCLUDE=1: `evaluation.downstream.include_path` may be used (lm-eval task files can
  load Python with `!function`); off by default.

Config validation reads these where the config loads: on the command line before anything starts, and
again on the worker in every task, which is the check that counts.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Mapping

KEY_ENVS_VAR = "SAO_ALLOWED_KEY_ENVS"
DEFAULT_KEY_ENVS = ("*_API_KEY",)
LM_EVAL_INCLUDE_VAR = "SAO_ALLOW_LM_EVAL_INCLUDE"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def allowed_key_envs(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The names and patterns of variables a config may name as an API key, from SAO_ALLOWED_KEY_ENVS."""
    env = os.environ if environ is None else environ
    raw = env.get(KEY_ENVS_VAR)
    if raw is None:
        return DEFAULT_KEY_ENVS
    return tuple(p.strip() for p in raw.split(",") if p.strip())


def key_env_problem(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """Why a config may not name `name` as the variable holding an API key here, or None."""
    if not _ENV_NAME.match(name):
        return f"{name!r} is not an environment variable name"
    allowed = allowed_key_envs(environ)
    if any(fnmatch.fnmatchcase(name, pattern) for pattern in allowed):
        return None
    shown = ", ".join(allowed) or "none"
    return (
        f"{name!r} is not a key this worker hands out (allowed: {shown}); the worker's operator decides "
        f"which variables a config may send as a key: {KEY_ENVS_VAR} in the worker's environment"
    )


def lm_eval_includes_allowed(environ: Mapping[str, str] | None = None) -> bool:
    """Whether SAO_ALLOW_LM_EVAL_INCLUDE=1 (or true/yes) is set here."""
    env = os.environ if environ is None else environ
    return env.get(LM_EVAL_INCLUDE_VAR, "").strip().lower() in ("1", "true", "yes")
