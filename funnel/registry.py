"""A small name → object registry with did-you-mean errors (towers, models)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

from funnel.errors import UserError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, yaml_key: str):
        self.kind = kind
        self.yaml_key = yaml_key
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered by {self._items[name]!r}")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        if name not in self._items:
            raise UserError(self.unknown(name))
        return self._items[name]

    def unknown(self, name: str) -> str:
        return (
            f"{self.yaml_key}: unknown {self.kind} {name!r}.{did_you_mean(name, self._items)} "
            f"Registered: {', '.join(sorted(self._items))}. A plug-in module listed under `plugins:` "
            "can register more."
        )

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def names(self) -> list[str]:
        return sorted(self._items)


def argument_problems(cls: type, kwargs: Mapping[str, Any], leading: int, path: str, what: str) -> list[str]:
    """YAML arguments that ``cls.__init__`` does not take, each with a did-you-mean and the
    list of what it does take. ``leading``: parameters the framework passes itself (self,
    shape, ...). A constructor with ``**kwargs`` takes anything."""
    params = list(inspect.signature(cls.__init__).parameters.values())[leading:]
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return []
    return [
        f"{path}.{key}: {what} has no argument {key!r}.{did_you_mean(key, names)} "
        f"Its arguments: {', '.join(names) or 'none'}."
        for key in kwargs
        if key not in names
    ]
