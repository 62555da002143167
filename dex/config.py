"""Configuration files: one typed loader for every YAML file the project reads, and for ``--set`` overrides.

A configuration is a dataclass (decorated with :data:`STRICT`, so that unknown keys are errors); pydantic checks and
converts the values against its annotations. Whatever is wrong comes back as one :class:`ConfigError` naming the
file, each key (``sources[2].frame_stride``, or the ``--set`` pair it came from), what was expected and the value,
before anything runs or is written.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import pydantic
import yaml

ConfigT = TypeVar("ConfigT")
#: The decorator for configuration dataclasses: keys they do not declare are errors, not silently dropped.
STRICT = pydantic.with_config(pydantic.ConfigDict(extra="forbid"))


class ConfigError(ValueError):
    """A configuration that does not fit its schema; ``str()`` is one line naming the file, keys and values."""


def read_yaml(path: str | Path, what: str = "config") -> dict[str, Any]:
    """A YAML file holding a mapping (an empty file is an empty mapping)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{path}: no such {what} file") from err
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read the {what} ({' '.join(str(err).split())})") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a {what} is a mapping of keys to values, not a {type(data).__name__}")
    return data


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["epochs=2", "model_args.num_experts=4"]`` -> nested dict; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {pair!r}: {part} is set to a value and cannot hold keys")
        try:
            node[leaf] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {pair!r}: not a YAML value ({' '.join(str(err).split())})") from err
    return out


def parse_part(part: str) -> tuple[int, int]:
    """``"I/N"`` (a job's share of work split N ways, as a cluster array gives it) -> (I, N), 0 <= I < N."""
    match = re.fullmatch(r"(\d+)/(\d+)", part)
    if not match or not 0 <= int(match.group(1)) < int(match.group(2)):
        raise ValueError(f"--part must be I/N with 0 <= I < N, got {part!r}")
    return int(match.group(1)), int(match.group(2))


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` over ``base``, mappings merged key by key."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _key(location: tuple) -> str:
    """``("sources", 2, "frame_stride")`` -> ``sources[2].frame_stride`` (pydantic's ``[key]`` marks the key of a
    mapping, already named by the part before it)."""
    text = ""
    for part in location:
        if part != "[key]":
            text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text


def _fields_at(cls: Any, location: tuple) -> list[str] | None:
    """The keys the schema allows at ``location`` (the parent of an unknown key), when it is a dataclass."""
    for part in location:
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        if isinstance(part, str) and part in hints:
            cls = hints[part]
        elif typing.get_origin(cls) in (list, dict) and typing.get_args(cls):
            cls = typing.get_args(cls)[-1]
        else:
            return None
        if typing.get_origin(cls) in (typing.Union, types.UnionType):
            cls = next((a for a in typing.get_args(cls) if dataclasses.is_dataclass(a)), cls)
    return [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else None


def _describe(error: dict[str, Any], cls: Any, given: dict[str, str]) -> str:
    location = tuple(error["loc"])
    key = _key(location)
    source = next((f" (--set {given[k]})" for k in given if key == k or key.startswith(k + ".")), "")
    if error["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        known = _fields_at(cls, location[:-1])
        return f"{key}: unknown key{source}" + (f"; the known keys are {', '.join(known)}" if known else "")
    if error["type"] in ("missing", "missing_argument"):
        return f"{key}: missing (required)"
    message = error["msg"].removeprefix("Value error, ")
    message = message[0].lower() + message[1:]
    if error["type"] == "value_error":
        return f"{key + ': ' if key else ''}{message}{source}"
    return f"{key}: {message}, got {error['input']!r}{source}"


def validate(cls: type[ConfigT], values: Any, where: str, given: dict[str, str] | None = None) -> ConfigT:
    """``values`` (a mapping) checked and converted into ``cls``; errors name ``where`` (a file) and the keys."""
    try:
        return pydantic.TypeAdapter(cls).validate_python(values)
    except pydantic.ValidationError as err:
        problems = "; ".join(_describe(e, cls, given or {}) for e in err.errors())
        raise ConfigError(f"{where}: {problems}") from None


def load_config(cls: type[ConfigT], path: str | Path | None = None, overrides: list[str] = ()) -> ConfigT:
    """Build ``cls`` from the YAML file at ``path`` (if any) and ``KEY=VALUE`` overrides."""
    values = read_yaml(path) if path is not None else {}
    given = {pair.partition("=")[0]: pair for pair in overrides}
    return validate(cls, merge(values, parse_overrides(list(overrides))), str(path) if path is not None else "--set",
                    given)


def save_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
