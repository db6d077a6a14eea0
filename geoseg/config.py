"""Recipes: YAML loaded into frozen dataclasses, strictly.

Unknown keys are errors naming the full key path (``train.optim.lr_max``),
values are converted to the annotated types, and ``key.path=value``
overrides from the command line are applied before validation. The resolved
recipe is written next to the outputs (:func:`to_dict`).
"""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from .errors import ConfigError

T = TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any] | None, path: str = "") -> T:
    """Build dataclass ``cls`` from a mapping; unknown keys raise ConfigError with their path."""
    data = dict(data or {})
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}.{unknown[0]}" if path else unknown[0]
        raise ConfigError(f"unknown recipe key '{where}'; valid keys here: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(hints[name], value, f"{path}.{name}" if path else name)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"recipe {path or 'root'}: {e}") from None


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        members = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(members[0], value, path)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"recipe key '{path}' must be a mapping, got {value!r}")
        return from_dict(tp, value, path)  # type: ignore[arg-type]
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"recipe key '{path}' must be a list, got {value!r}")
        args = get_args(tp)
        item = args[0] if args else Any
        return tuple(_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"recipe key '{path}' must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, str):
            if value.lower() in ("true", "yes", "1"):
                return True
            if value.lower() in ("false", "no", "0"):
                return False
        if isinstance(value, bool):
            return value
        raise ConfigError(f"recipe key '{path}' must be true or false, got {value!r}")
    if tp in (int, float, str):
        try:
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"recipe key '{path}' must be {tp.__name__}, got {value!r}") from None
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings (values parsed as YAML scalars) to a nested mapping."""
    out = yaml.safe_load(yaml.safe_dump(data)) or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value, e.g. train.epochs=10")
        key, raw = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: '{p}' is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return out


def load_recipe(cls: type[T], path: str | Path, overrides: list[str] | None = None) -> T:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe {p} does not exist; see recipes/ for examples")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    return from_dict(cls, apply_overrides(data, overrides or []))


def to_dict(obj: Any) -> Any:
    """A recipe dataclass as plain YAML-ready data."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


__all__ = ["from_dict", "apply_overrides", "load_recipe", "to_dict"]
