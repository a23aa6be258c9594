"""Turn a plain composed mapping into the schema dataclasses, rejecting unknown and missing keys.

Types and values are checked by the dataclasses themselves (``__post_init__``); this module only
knows the shape of the tree, so that every error still names the full dotted key.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Mapping

from rangedispatch.config.checks import fail
from rangedispatch.errors import ConfigError

MISSING_VALUE = "???"


def build_dataclass(cls: type, data: Any, prefix: str) -> Any:
    if dataclasses.is_dataclass(data) and isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise fail(prefix, data, f"a mapping with keys {', '.join(_field_names(cls))}")
    hints = typing.get_type_hints(cls)
    names = _field_names(cls)
    unknown = [k for k in data if k not in names]
    if unknown:
        key = _join(prefix, unknown[0])
        raise ConfigError(f"unknown key {key!r}; allowed keys under {prefix or 'the root'}: {', '.join(names)}")
    kwargs = {}
    for name, value in data.items():
        key = _join(prefix, name)
        if value == MISSING_VALUE:
            raise ConfigError(f"{key} is required (it is '???'); set it, e.g. {key}=...")
        kwargs[name] = _build_value(hints[name], value, key)
    return cls(**kwargs)


def _build_value(hint: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, key)
    if typing.get_origin(hint) is dict:
        _, value_type = typing.get_args(hint)
        if dataclasses.is_dataclass(value_type) and isinstance(value, Mapping):
            return {str(k): build_dataclass(value_type, v, _join(key, str(k))) for k, v in value.items()}
    return value


def schema_at(cls: type, path: str) -> Any:
    """The dataclass a dotted key path leads to from ``cls`` (through dict values), else None."""
    for part in [p for p in path.split(".") if p]:
        if dataclasses.is_dataclass(cls):
            cls = typing.get_type_hints(cls).get(part)
        elif typing.get_origin(cls) is dict:
            cls = typing.get_args(cls)[1]
        else:
            return None
    return cls if dataclasses.is_dataclass(cls) else None


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
