"""Config machinery shared by every config dataclass: checks, YAML/command-line values -> typed fields, --help docs.

Nothing here knows a particular config class; the classes (``training``, ``tools``, and others elsewhere such as
``experiments.sentiment.SentimentConfig``) call the checks from their ``validate`` and are loaded by ``load_config``.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, Protocol, TypeVar

import yaml

from ..errors import ConfigError


class Validating(Protocol):
    def validate(self) -> None: ...


C = TypeVar("C", bound=Validating)

DTYPES = ("float32", "bfloat16", "float16")
"""Parameter dtypes by name; ``prefopt.models.DTYPES`` maps these same names to torch dtypes."""


# ---------------------------------------------------------------------------------------------------------
# Checks used by the validate() methods


def check_field(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"invalid {name} = {value!r}: must be {allowed}.")


def check_required(cfg: Any, *names: str) -> None:
    """Each named field must be set (non-empty)."""
    for name in names:
        if not getattr(cfg, name):
            raise ConfigError(f"'{name}' is required (flag --{name.replace('_', '-')} or YAML key {name}).")


def check_length_limits(max_length: int | None, max_prompt_length: int | None) -> None:
    """max_length >= 2 and 1 <= max_prompt_length < max_length, for the limits that are set (None: not yet
    known; a training run fills them from the model: ``train.setup.resolve_length_limits``)."""
    check_field(max_length is None or max_length >= 2, "max_length", max_length, "an integer >= 2")
    if max_prompt_length is not None:
        upper = f"between 1 and max_length - 1 ({max_length - 1})" if max_length else "an integer >= 1"
        check_field(max_prompt_length >= 1 and (max_length is None or max_prompt_length < max_length),
                    "max_prompt_length", max_prompt_length, upper)


def check_reward_fn(reward_fn: str | None) -> None:
    """A reward function is named 'module:function' or 'path/to/file.py:function' (None: not given)."""
    if reward_fn and ":" not in reward_fn:
        raise ConfigError(f"invalid reward_fn = {reward_fn!r}: must be 'module:function' or "
                          "'path/to/file.py:function'.")


# ---------------------------------------------------------------------------------------------------------
# Loading: YAML file + overrides -> dataclass


def field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) for X | None annotations."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return inner[0], True
    return tp, False


def coerce(name: str, tp: Any, value: Any) -> Any:
    """Convert a YAML or command-line value to the field's type, or raise ConfigError."""
    base, optional = unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise ConfigError(f"invalid {name} = None: a value is required.")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base is str:
            return str(value)
        if typing.get_origin(base) is list:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            return [str(v) for v in value]
    except (TypeError, ValueError):
        pass
    else:
        return value
    tname = getattr(base, "__name__", str(base))
    raise ConfigError(f"invalid {name} = {value!r}: expected {tname}.")


def from_dict(cls: type[C], values: dict[str, Any], *, origin: str = "config") -> C:
    """Build and validate a config; unknown keys are errors with a suggestion."""
    types_ = field_types(cls)
    kwargs = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in types_:
            close = difflib.get_close_matches(name, types_, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{origin}: unknown key '{key}' for {cls.__name__}.{hint} "
                              f"Valid keys: {', '.join(sorted(types_))}.")
        kwargs[name] = coerce(name, types_[name], value)
    config = cls(**kwargs)
    config.validate()
    return config


def load_config(cls: type[C], path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> C:
    """Read a YAML file (optional), apply overrides (e.g. from the command line), validate."""
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping of option: value at the top level.")
        values.update(loaded)
    values.update(overrides or {})
    return from_dict(cls, values, origin=str(path) if path else "config")


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> None:
    """Write the config as YAML, atomically (a crash mid-write leaves the previous file, never half of one)."""
    import os

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    os.replace(tmp, path)


def field_docs(cls: type) -> dict[str, str]:
    """Field docs for --help: the attribute docstring (the string literal after each field), read from the
    source of every dataclass in the MRO, base classes first so that a subclass's docstring wins; a field whose
    doc is shared text gives it as ``field(metadata={"doc": ...})`` instead."""
    import ast
    import inspect

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        own = klass.__dict__.get("__annotations__", {})
        for name in own:
            f = klass.__dataclass_fields__.get(name)  # type: ignore[attr-defined]
            if f is not None and "doc" in f.metadata:
                docs[name] = " ".join(str(f.metadata["doc"]).split())
        try:
            tree = ast.parse(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:] + [None]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                    docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs
