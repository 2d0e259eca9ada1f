"""Turn raw YAML mappings into frozen dataclasses, collecting every problem at once.

The converter walks the type hints of the target dataclass: unknown keys are rejected
with a did-you-mean, missing required keys are named, scalars are type-checked, and
``Literal`` fields list their choices. A dataclass may define ``__from_raw__`` to take
over its own conversion (see :class:`funnel.spec.schema.TowerSpec`).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union

from funnel.errors import did_you_mean

MISSING = dataclasses.MISSING


def describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def convert(tp: Any, value: Any, path: str, errors: list[str]) -> Any:
    """Convert ``value`` to type ``tp``; append a message to ``errors`` on failure."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return convert(inner[0], value, path, errors)
        for candidate in inner:  # first that converts cleanly
            trial: list[str] = []
            out = convert(candidate, value, path, trial)
            if not trial:
                return out
        errors.append(f"{path}: {describe(value)} is not {type_text(tp)}.")
        return None
    if origin is Literal:
        if value in args:
            return value
        hint = did_you_mean(value, [str(a) for a in args]) if isinstance(value, str) else ""
        choices = ", ".join(str(a) for a in args)
        errors.append(f"{path}: {describe(value)} is not one of {choices}.{hint}")
        return None
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            errors.append(f"{path}: expected a list, got {describe(value)}.")
            return ()
        item_tp = args[0] if args else Any
        return tuple(convert(item_tp, v, f"{path}[{i}]", errors) for i, v in enumerate(value))
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            errors.append(f"{path}: expected a mapping, got {describe(value)}.")
            return {}
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path, errors)
    if tp is bool:
        if isinstance(value, bool):
            return value
        errors.append(f"{path}: expected true or false, got {describe(value)}.")
        return None
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        errors.append(f"{path}: expected an integer, got {describe(value)}.")
        return None
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads "1e-5" (no dot) as a string
        errors.append(f"{path}: expected a number, got {describe(value)}.")
        return None
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        errors.append(f"{path}: expected a string, got {describe(value)}.")
        return None
    return value


_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def build(cls: type, raw: Any, path: str, errors: list[str], *, hook: bool = True) -> Any:
    """Build dataclass ``cls`` from mapping ``raw`` (``None`` means all defaults).

    ``hook=False`` skips the class's ``__from_raw__`` (for hooks that wrap this).
    """
    custom = getattr(cls, "__from_raw__", None) if hook else None
    if custom is not None:
        return custom(raw, path, errors)
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        errors.append(f"{path or 'config'}: expected a mapping of keys, got {describe(raw)}.")
        return None
    n_before = len(errors)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in raw:
        if key not in fields:
            where = f"{path}.{key}" if path else str(key)
            errors.append(f"{where}: unknown key.{did_you_mean(key, fields)} Allowed keys: {', '.join(fields)}.")
    kwargs: dict[str, Any] = {}
    for name, field in fields.items():
        where = f"{path}.{name}" if path else name
        if name in raw:
            kwargs[name] = convert(hints[name], raw[name], where, errors)
        elif field.default is MISSING and field.default_factory is MISSING:
            errors.append(f"{where}: required key is missing.")
    try:
        return cls(**{k: v for k, v in kwargs.items() if v is not None or _nullable(hints[k])})
    except (TypeError, ValueError) as exc:
        if len(errors) == n_before:  # otherwise the cause is already reported
            errors.append(f"{path or 'config'}: {exc}")
        return None


def _nullable(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp)


def type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def matches(tp: Any, value: Any) -> bool:
    """Whether ``value`` (as YAML gives it) already is of type ``tp``, without converting it;
    for the Lightning Trainer's own type hints, whose values funnel passes on unchanged."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or isinstance(tp, typing.TypeVar):
        return True
    if origin in (Union, types.UnionType):
        return any(matches(a, value) for a in args)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and all(matches(args[0] if args else Any, v) for v in value)
    if origin in (dict, Mapping) or tp is dict:
        return isinstance(value, Mapping)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True  # a hint funnel does not know how to check: Lightning will


def type_text(tp: Any) -> str:
    """A type hint in words: 'an integer or null', "one of '16-mixed', 'bf16-mixed'"."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        literals = [a for arg in args if typing.get_origin(arg) is Literal for a in typing.get_args(arg)]
        others = [type_text(a) for a in args if typing.get_origin(a) is not Literal]
        parts = ([f"one of {', '.join(map(repr, literals))}"] if literals else []) + others
        return " or ".join(dict.fromkeys(parts))
    if origin is Literal:
        return f"one of {', '.join(map(repr, args))}"
    names = {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if tp in names:
        return names[tp]
    if origin in (list, tuple):
        return f"a list of {type_text(args[0]) if args else 'values'}"
    if origin in (dict, Mapping) or tp is dict:
        return "a mapping"
    return f"a {getattr(tp, '__name__', str(tp))}"
