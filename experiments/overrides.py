"""The one override mechanism: YAML layers and `key=value` items -> one mapping -> a validated dataclass.

Run configs (experiments/config.py), evaluation options (experiments/evals/options.py), sweeps
(experiments/sweeps/spec.py) and `llamoe bench` all read their inputs through these functions, so a
value means the same everywhere:

- YAML is read as YAML 1.1 (safe) plus floats without a dot such as `1e-3`, as OmegaConf reads them.
- A `key=value` item's value is parsed as YAML: `3` is an int, `null` is None, `[1, 2]` a list.
- Layers are mappings with nested or dotted keys ({"train": {"seq_len": 8}} or {"train.seq_len": 8});
  code passes mappings, never text to be parsed again.
- Every error is a ConfigError naming the dotted key (with the caller's prefix) and the fix.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import is_dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from llamoe.config_error import ConfigError

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """YAML 1.1 safe loading, plus floats without a dot such as `1e-3`."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9]+[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def read_yaml(text: str, key: str = "CONFIG") -> Any:
    """Parse YAML text; a syntax error is a ConfigError on `key`."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506  (a SafeLoader subclass)
    except yaml.YAMLError as e:
        raise ConfigError(key, f"is not valid YAML: {e}") from None


def read_yaml_file(path: str | Path, key: str = "CONFIG") -> dict[str, Any]:
    """A YAML file holding a mapping (an empty file is {}); errors name `key` and the path."""
    path = Path(path).expanduser()
    if not path.exists() or path.is_dir():  # (a device such as /dev/null reads as an empty file)
        where = "it is a directory" if path.is_dir() else "no such file"
        raise ConfigError(key, f"cannot read {str(path)!r} ({where})")
    data = read_yaml(path.read_text(), key)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(key, f"{path} must hold a mapping, got {type(data).__name__}")
    return data


def parse_item(item: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value), the value parsed as YAML (an empty value is "")."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(item, "overrides take the form key=value (for example train.max_steps=100)")
    if not text.strip():
        return key, ""
    try:
        return key, yaml.load(text, Loader=_Loader)  # noqa: S506
    except yaml.YAMLError:
        return key, text  # not YAML (e.g. an unbalanced bracket in a path): the text itself


def parse_items(items: Iterable[str]) -> dict[str, Any]:
    """`key=value` items -> a dotted-key mapping in command-line order (a later item wins)."""
    out: dict[str, Any] = {}
    for item in items:
        key, value = parse_item(item)
        out.pop(key, None)  # keep the order in which the keys were last given
        out[key] = value
    return out


def as_layer(overrides: Mapping[str, Any] | Iterable[str] | None) -> dict[str, Any]:
    """Overrides given as a mapping (nested or dotted keys) or as `key=value` items -> a dotted mapping."""
    if overrides is None:
        return {}
    if isinstance(overrides, Mapping):
        return dict(overrides)
    return parse_items(overrides)


def flatten(mapping: Any, key: str = "", prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> dotted keys: {model: {dim: 64}} -> {"model.dim": 64}. An empty mapping is a value.

    `key` names the mapping in errors (a non-mapping, or a key that is not a non-empty string)."""
    if not isinstance(mapping, Mapping):
        raise ConfigError(key or "<overrides>", f"must be a mapping of keys to values, got {type(mapping).__name__}")
    flat: dict[str, Any] = {}
    for k, v in mapping.items():
        if not isinstance(k, str) or not k:
            raise ConfigError(key or "<overrides>", f"keys must be non-empty strings, got {k!r}")
        dotted = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            flat.update(flatten(v, f"{key}.{k}" if key else k, dotted + "."))
        else:
            flat[dotted] = v
    return flat


def unflatten(mapping: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted keys -> nested mappings ({"train.seq_len": 8} -> {"train": {"seq_len": 8}}); later keys win."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        head, dot, rest = str(key).partition(".")
        if dot:
            value = unflatten({rest: value})
        elif isinstance(value, Mapping):
            value = unflatten(value)
        out[head] = merge(out[head], value) if isinstance(value, dict) and isinstance(out.get(head), dict) else value
    return out


def merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `update` merged in: nested mappings merge, anything else replaces."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def to_dataclass(cls: type[T], layers: Iterable[Any], prefix: str = "") -> T:
    """`cls`'s defaults <- each layer in order (a dataclass instance or a mapping, nested or dotted keys),
    type-checked by OmegaConf. Unknown keys and wrong types are a ConfigError naming `prefix.key`."""
    assert is_dataclass(cls)
    nested = [layer if is_dataclass(layer) else unflatten(layer or {}) for layer in layers]
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls), *nested)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        key = e.full_key or _failing_key(cls, nested)
        raise ConfigError(".".join(p for p in (prefix, key) if p), omegaconf_message(e)) from None


def _failing_key(cls: type, layers: list[Any]) -> str:
    """The top-level key that fails alone (OmegaConf names none when, e.g., a section is a scalar)."""
    for layer in layers:
        for k, v in layer.items() if isinstance(layer, Mapping) else []:
            try:
                OmegaConf.merge(OmegaConf.structured(cls), {k: v})
            except OmegaConfBaseException:
                return str(k)
    return "?"


def omegaconf_message(e: OmegaConfBaseException) -> str:
    """OmegaConf's first line, said as what went wrong."""
    first = str(e).splitlines()[0]
    if type(e).__name__ == "ConfigKeyError":
        return f"unknown key ({first})"
    return f"wrong type or value ({first})"


def format_items(mapping: Mapping[str, Any]) -> str:
    """A dotted mapping shown as `key=value` items, for people to read (plans, logs); never parsed back."""
    return " ".join(
        f"{k}={v if isinstance(v, str) else yaml.safe_dump(v, default_flow_style=True).strip()}"
        for k, v in mapping.items()
    ).replace("\n...", "")


__all__ = [
    "ConfigError",
    "as_layer",
    "flatten",
    "format_items",
    "merge",
    "omegaconf_message",
    "parse_item",
    "parse_items",
    "read_yaml",
    "read_yaml_file",
    "to_dataclass",
    "unflatten",
]
