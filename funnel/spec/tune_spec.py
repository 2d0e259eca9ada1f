"""The ``tune:`` block: a search space over config keys, for ``funnel tune``.

    tune:
      optim.lr: {log_uniform: [1.0e-4, 1.0e-2]}
      funnel.embed_dim: {choice: [8, 16, 32]}
      funnel.tower.hidden: {choice: [[128, 64], [256, 128]]}

Each key is a dotted config key (list items by name or index, as in ``key.sub=value``
overrides); nested mappings (``optim: {lr: {...}}``, what ``tune.optim.lr=...`` on the command
line writes) are the same keys. Kinds: ``uniform`` and ``log_uniform`` (floats), ``int`` and
``log_int`` (integers, both ends included), ``choice`` (any YAML values, lists and mappings
too). ``funnel fit`` ignores the block; ``funnel tune`` also checks every range end and every
choice against the config before the first trial (see :func:`space_problems`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from funnel.errors import ConfigError, did_you_mean

ParamKind = Literal["uniform", "log_uniform", "int", "log_int", "choice"]
KINDS: tuple[str, ...] = typing.get_args(ParamKind)
EXAMPLE = "{log_uniform: [1.0e-4, 1.0e-2]}, {int: [1, 4]} or {choice: [[128, 64], [256, 128]]}"
# set by funnel tune itself (each trial is its own run directory), or not a value to search
NOT_TUNABLE = ("tune", "run_dir", "init_from", "plugins")


def yaml_text(value: Any) -> str:
    """``value`` as one line of YAML, the text of a ``key=value`` override (floats round-trip)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=math.inf)
    return text.removesuffix("\n...\n").strip()


@dataclass(frozen=True)
class ParamSpec:
    """One searched key: a range (``low``..``high``) or YAML-text ``choices``."""

    key: str
    kind: ParamKind
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()  # each a YAML text (see yaml_text), so that lists and mappings hash

    @property
    def ends(self) -> tuple[str, ...]:
        """The values every trial lies between (YAML texts): both range ends, or every choice."""
        if self.kind == "choice":
            return self.choices
        as_int = self.kind in ("int", "log_int")
        return tuple(yaml_text(int(v) if as_int else float(v)) for v in (self.low, self.high))

    def describe(self) -> str:
        if self.kind == "choice":
            return f"choice of {', '.join(self.choices)}"
        return f"{self.kind} in [{self.ends[0]}, {self.ends[1]}]"


@dataclass(frozen=True)
class TuneSpec:
    """The search space of ``funnel tune``, one ParamSpec per config key."""

    params: tuple[ParamSpec, ...]

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.params]

    @classmethod
    def __from_raw__(cls, raw: Any, path: str, errors: list[str]) -> TuneSpec | None:
        from funnel.spec.convert import build, describe

        if not isinstance(raw, dict) or not raw:
            errors.append(f"{path}: expected a mapping of config keys to search spaces, e.g. optim.lr: {EXAMPLE}.")
            return None
        if set(raw) == {"params"} and isinstance(raw["params"], list):  # the form a run's config.yaml writes
            params = [build(ParamSpec, p, f"{path}.params[{i}]", errors) for i, p in enumerate(raw["params"])]
            return cls(tuple(params)) if all(params) else None
        params, ok = [], True
        for key, space in _leaves(raw, ""):
            where = f"{path}.{key}"
            problems = key_problems(key, where) or _space_problems(space, where, describe)
            errors += problems
            ok = ok and not problems
            if not problems:
                params.append(_param(key, space))
        return cls(tuple(params)) if ok else None


def _leaves(node: dict[str, Any], prefix: str):
    """(dotted key, space) pairs. A mapping whose values are all mappings and none of whose keys
    names a kind is a section of further keys; anything else is a space (checked as one)."""
    for k, v in node.items():
        key = f"{prefix}{k}"
        section = isinstance(v, dict) and v and all(isinstance(x, dict) for x in v.values())
        if section and not set(map(str, v)) & set(KINDS):
            yield from _leaves(v, f"{key}.")
        else:
            yield key, v


def _space_problems(space: Any, where: str, describe) -> list[str]:
    if not isinstance(space, dict) or len(space) != 1:
        return [f"{where}: expected one search space such as {EXAMPLE}, got {describe(space)}."]
    kind, value = next(iter(space.items()))
    if kind not in KINDS:
        return [
            f"{where}: {kind!r} is not a kind of search space.{did_you_mean(kind, KINDS)} Kinds: {', '.join(KINDS)}."
        ]
    if kind == "choice":
        if not isinstance(value, list) or not value:
            return [f"{where}.choice: expected a non-empty list of values, got {describe(value)}."]
        texts = [yaml_text(v) for v in value]
        if len(set(texts)) < len(texts):
            return [f"{where}.choice: the values must differ, got {describe(value)}."]
        return []
    integer = kind in ("int", "log_int")
    numbers = isinstance(value, list) and len(value) == 2 and all(_is_number(v, integer) for v in value)
    if not numbers:
        what = "integers" if integer else "numbers"
        return [f"{where}.{kind}: expected [low, high], two {what}, got {describe(value)}."]
    low, high = (float(v) for v in value)
    if not low < high:
        return [f"{where}.{kind}: low must be below high, got [{value[0]}, {value[1]}]."]
    if kind.startswith("log") and low <= 0:
        return [f"{where}.{kind}: a log scale needs low > 0, got {value[0]}; use {kind.removeprefix('log_')}."]
    return []


def _is_number(value: Any, integer: bool) -> bool:
    from funnel.spec.convert import _SCIENTIFIC

    if isinstance(value, str) and not integer and _SCIENTIFIC.fullmatch(value.strip()):
        return True  # YAML 1.1 reads 1e-4 (no dot) as a string
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value) and (not integer or float(value).is_integer())


def _param(key: str, space: dict[str, Any]) -> ParamSpec:
    kind, value = next(iter(space.items()))
    if kind == "choice":
        return ParamSpec(key, kind, choices=tuple(yaml_text(v) for v in value))
    low, high = (float(v) for v in value)
    return ParamSpec(key, kind, low=low, high=high)


def key_problems(key: str, where: str) -> list[str]:
    """Whether ``key`` names a config key, walking the schema's dataclasses; below a plug-in's
    arguments (tower, model, trainer) the keys are open, and the trial config checks them."""
    from funnel.spec.schema import Config

    parts = key.split(".")
    if parts[0] in NOT_TUNABLE:
        return [f"{where}: {parts[0]} cannot be tuned (funnel tune sets it, or it is not a value to search)."]
    tp: Any = Config
    for depth, part in enumerate(parts):
        above = ".".join(parts[:depth]) or "the config"
        if typing.get_origin(tp) is tuple:  # features or stages: an item by name or index
            tp = typing.get_args(tp)[0]
            continue
        if not dataclasses.is_dataclass(tp):
            return [f"{where}: {above} is a single value, not a section with key {part!r}."]
        if tp.__name__ in ("TowerSpec", "ModelSpec", "TrainerSpec"):
            return []  # open arguments: checked by the registry through the trial config
        fields = [f.name for f in dataclasses.fields(tp) if f.init]
        if part not in fields:
            return [f"{where}: {above} has no key {part!r}.{did_you_mean(part, fields)} Keys: {', '.join(fields)}."]
        tp = _strip_optional(typing.get_type_hints(tp)[part])
    if dataclasses.is_dataclass(tp) and tp.__name__ not in ("TowerSpec", "ModelSpec"):
        return [f"{where}: {key} is a section; search one of its keys, e.g. {key}.{dataclasses.fields(tp)[0].name}."]
    return []


def _strip_optional(tp: Any) -> Any:
    """``X | None`` -> ``X``; any other hint as it is."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    optional = typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1
    return args[0] if optional else tp


def apply_values(raw: dict[str, Any], values: dict[str, str]) -> dict[str, Any]:
    """A copy of ``raw`` (without its tune block) with every ``key: YAML text`` set, as overrides."""
    from funnel.spec.loader import apply_override

    out = copy.deepcopy({k: v for k, v in raw.items() if k != "tune"})
    for key, text in values.items():
        apply_override(out, f"{key}={text}")
    return out


def space_problems(raw: dict[str, Any], spec: TuneSpec) -> list[str]:
    """Every range end and choice of ``spec``, set alone into ``raw``, must give a valid config."""
    from funnel.spec.loader import config_from_dict

    problems: list[str] = []
    for param in spec.params:
        seen: set[str] = set()  # a wrong key fails at every value: said once
        for text in param.ends:
            try:
                config_from_dict(apply_values(raw, {param.key: text}))
            except ConfigError as exc:
                problems += [f"tune.{param.key}: with {param.key}={text}: {p}" for p in exc.problems if p not in seen]
                seen.update(exc.problems)
    return problems
