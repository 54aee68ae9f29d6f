"""Typed checks of the training configuration, derived from the ``TrainConfig`` dataclass.

Values from a YAML / JSON file (or a checkpoint) are validated by pydantic's
``TypeAdapter`` over the dataclass itself, in strict mode: every field's type
hint is the rule, so a field added to the dataclass is checked without a line
here. ``epochs: two``, ``epochs: 1.5``, ``batch_size: '2'``, ``spatial_size: 64``
or ``resume: 'no'`` are refused with the key, the expected type and the value
given; ``lr: 1e-3`` is a float (YAML 1.1 would read it as a string; the loader
below reads YAML 1.2 numbers) and an integer is accepted where a float is
expected. Syntax errors in the file name the file, line and column.

:func:`check_declared` checks the values against what each field declares besides
its type (``option(choices=..., at_least=..., above=..., within=...)`` in
``train/config.py``), so that a choice or a bound is stated once, with the field.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import typing
from pathlib import Path
from typing import Any, Dict, List

__all__ = [
    "ConfigError",
    "validate_types",
    "check_declared",
    "parse_config_text",
    "describe_type",
]


class ConfigError(ValueError):
    """A configuration value or file that cannot be used (one line per problem)."""


@functools.lru_cache(maxsize=None)
def _adapter(cls):
    from pydantic import TypeAdapter

    return TypeAdapter(cls)


def describe_type(hint: Any) -> str:
    """A type hint in words: ``Optional[List[int]]`` -> "a list of integers (or null)"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        parts = [describe_type(a) for a in args if a is not type(None)]
        text = " or ".join(parts)
        return text + " (or null)" if type(None) in args else text
    if origin in (list, List):
        inner = describe_type(args[0]) if args else "values"
        plural = {"an integer": "integers", "a number": "numbers", "a string": "strings"}
        return f"a list of {plural.get(inner, inner)}"
    if origin in (dict, typing.Dict):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )


def validate_types(cls, values: Dict[str, Any], source: str) -> None:
    """Raise :class:`ConfigError` naming every key of ``values`` whose type does not fit ``cls``."""
    from pydantic import ValidationError

    try:
        payload = json.dumps(values, default=str)
    except (TypeError, ValueError) as exc:  # a value JSON cannot hold (NaN keys, ...)
        raise ConfigError(f"{source}: cannot read the options ({exc})") from None
    try:
        _adapter(cls).validate_json(payload, strict=True)
    except ValidationError as exc:
        hints = typing.get_type_hints(cls)
        problems: List[str] = []
        seen = set()
        for err in exc.errors():
            loc = err.get("loc") or ()
            key = str(loc[0]) if loc else "?"
            if key in seen:
                continue
            seen.add(key)
            given = values.get(key, err.get("input"))
            expected = describe_type(hints[key]) if key in hints else err.get("msg", "")
            flag = "--" + key.replace("_", "-")
            problems.append(
                f"{key} ({flag}): expected {expected}, got {given!r} ({type(given).__name__})"
            )
        raise ConfigError(f"{source}: " + "; ".join(problems)) from None


def check_declared(cfg) -> None:
    """Raise ValueError for the first field of the dataclass instance ``cfg`` whose value
    lies outside the choices or bounds its declaration gives (an optional field's None,
    which means "the default", always passes)."""
    for f in dataclasses.fields(cfg):
        meta, value = f.metadata, getattr(cfg, f.name)
        if value is None and f.default is None:
            continue
        choices = meta.get("choices")
        if choices is not None and value not in choices:
            raise ValueError(f"{f.name} must be one of {list(choices)}, got {value!r}")
        if meta.get("at_least") is not None and not value >= meta["at_least"]:
            raise ValueError(f"{f.name} must be >= {meta['at_least']:g}, got {value}")
        if meta.get("above") is not None and not value > meta["above"]:
            raise ValueError(f"{f.name} must be > {meta['above']:g}, got {value}")
        if meta.get("within") is not None:
            lo, hi = meta["within"]
            if not lo <= value <= hi:
                raise ValueError(f"{f.name} must be in [{lo:g}, {hi:g}], got {value}")


# ----------------------------------------------------------------------------- files


def _yaml_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        """SafeLoader that reads YAML 1.2 numbers: ``1e-3`` is a float, not a string."""

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"),
    )
    return Loader


def parse_config_text(text: str, path: Path) -> Any:
    """The value of a YAML or JSON file; syntax errors as ``file:line:column: what``."""
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"{path}:{exc.lineno}:{exc.colno}: JSON syntax error: {exc.msg}"
            ) from None
    import yaml

    try:
        return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 (a SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        what = " ".join(str(p) for p in (exc.context, exc.problem) if p)
        raise ConfigError(f"{where}: YAML syntax error: {what}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: YAML syntax error: {exc}") from None
