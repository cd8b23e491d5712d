"""A RoundConfig from a raw mapping plus `--set a.b=c` overrides, with errors that name the key.

    cfg = build_config({"personas": {"n": 8}}, ["judging.swap=true"])

Unknown keys are refused with the key's full name and the keys allowed there (STYLE.md rule 2); values
that YAML reads as dates, sets or bytes are refused by key.
"""

from __future__ import annotations

import datetime
import difflib
import types
import typing
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from sao_core.config.sections import RoundConfig
from sao_core.errors import ConfigError


def _scalar_type(annotation: Any) -> type | None:
    """bool, int or float for a field of that type (or that type or None); else None."""
    args = (
        typing.get_args(annotation)
        if typing.get_origin(annotation) in (typing.Union, types.UnionType)
        else ()
    )
    kinds = [a for a in args if a is not type(None)] if args else [annotation]
    return kinds[0] if len(kinds) == 1 and kinds[0] in (bool, int, float) else None


def _check_keys(model: type[BaseModel], data: Any, prefix: str) -> None:
    """Refuse unknown keys before pydantic does, naming the full key and what is allowed there; and
    what pydantic would let through: true for a number (personas.n: true is 1), text or 0/1 for a switch."""
    if not isinstance(data, dict):
        return
    allowed = list(model.model_fields)
    for key, value in data.items():
        if key not in model.model_fields:
            where = prefix.rstrip(".") or "the top level"
            hint = difflib.get_close_matches(str(key), allowed, n=1)
            did_you_mean = f" (did you mean '{prefix}{hint[0]}'?)" if hint else ""
            raise ConfigError(
                f"unknown config key '{prefix}{key}'{did_you_mean}; allowed keys in {where}: "
                + ", ".join(allowed)
            )
        annotation = model.model_fields[key].annotation
        scalar = _scalar_type(annotation)
        if value is not None and scalar is bool and not isinstance(value, bool):
            raise ConfigError(f"config key '{prefix}{key}' is true or false, got {value!r}")
        if scalar in (int, float) and isinstance(value, bool):
            raise ConfigError(f"config key '{prefix}{key}' needs a number, got {value!r}")
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if value is not None and not isinstance(value, dict):
                raise ConfigError(
                    f"config key '{prefix}{key}' is a section and needs a mapping, got {value!r}"
                )
            _check_keys(annotation, value, f"{prefix}{key}.")


def _apply_override(data: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.key=value")
    dotted, _, raw = override.partition("=")
    parts = dotted.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {override!r} has an empty key part")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: '{part}' is a value, not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {override!r}: value is not valid YAML: {e}") from e


def _plain(value: Any, key: str) -> Any:
    """A deep copy of a raw config value made of mappings, lists, text, numbers, booleans and None;
    anything else (a YAML date or timestamp, !!binary, !!set) is refused with its key."""
    if isinstance(value, dict):
        return {k: _plain(v, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, key) for v in value]
    if value is None or isinstance(value, (str, int, float)):
        return value
    hint = "; quote it to make it text" if isinstance(value, (datetime.date, datetime.datetime)) else ""
    raise ConfigError(f"config key '{key}' holds a {type(value).__name__} ({value!r}){hint}")


def build_config(data: dict[str, Any] | None, overrides: list[str] | tuple[str, ...] = ()) -> RoundConfig:
    """Validate a raw mapping (plus overrides) into a RoundConfig, with errors that name the key."""
    data = _plain(data or {}, "")
    if not isinstance(data, dict):
        raise ConfigError(f"a config is a mapping of sections, got {type(data).__name__}")
    for override in overrides:
        _apply_override(data, override)
    data = _plain(data, "")  # an override's value is YAML too
    _check_keys(RoundConfig, data, "")
    try:
        return RoundConfig.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"])
            problems.append(f"'{key}': {err['msg']} (got {err.get('input')!r})" if key else err["msg"])
        raise ConfigError("invalid config: " + "; ".join(problems)) from e


def config_to_dict(cfg: BaseModel) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def config_to_yaml(cfg: RoundConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
