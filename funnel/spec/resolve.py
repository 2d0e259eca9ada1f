"""The resolved config: every plug-in's arguments written out, defaults included.

A config names a tower, a bottom and a model with only the arguments it changes
(``tower: {type: mlp, dropout: 0.1}``); the resolved config carries the rest from the
constructor's or builder's signature (``hidden: [128, 64], activation: relu, ...``), so the
run's config.yaml shows every value the run used and reloads to the same model even if a
default changes in a later release. Only plain YAML values (numbers, strings, booleans, null
and lists or mappings of them) are filled in; anything else stays the constructor's own.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

from funnel.spec.schema import Config, ModelSpec, TowerSpec

_PLAIN = (bool, int, float, str, type(None))


def _plain(value: Any) -> bool:
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def _freeze(value: Any) -> Any:
    """Lists and tuples as tuples, the form the spec layer keeps arguments in."""
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def signature_defaults(factory: Callable[..., Any], leading: int) -> dict[str, Any]:
    """The plain defaults of ``factory``'s arguments after the ``leading`` ones it is given by funnel."""
    target = factory.__init__ if inspect.isclass(factory) else factory
    params = list(inspect.signature(target).parameters.values())[leading:]
    return {
        p.name: _freeze(p.default)
        for p in params
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is not p.empty and _plain(p.default)
    }


def _filled(spec: TowerSpec | ModelSpec, defaults: dict[str, Any]) -> TowerSpec | ModelSpec:
    merged = {**defaults, **spec.kwargs}
    return dataclasses.replace(spec, params=tuple(sorted(merged.items())))


def with_defaults(cfg: Config) -> Config:
    """``cfg`` (valid) with every tower's, the bottom's and the model's defaults filled in."""
    from funnel.models import MODELS, TOWERS
    from funnel.models.bottoms import BOTTOMS

    def tower(spec: TowerSpec | None) -> TowerSpec | None:
        if spec is None or spec.type not in TOWERS:
            return spec
        return _filled(spec, signature_defaults(TOWERS.get(spec.type), 2))  # self, shape

    f = cfg.funnel
    bottom = f.bottom
    if bottom is not None and bottom.type in BOTTOMS:
        bottom = _filled(bottom, signature_defaults(BOTTOMS.get(bottom.type), 3))  # self, shape, stages
    model = f.model
    if model.type in MODELS:
        model = _filled(model, signature_defaults(MODELS.get(model.type).build, 3))  # graph, spec, layout
    stages = tuple(dataclasses.replace(s, tower=tower(s.tower)) for s in f.stages)
    funnel = dataclasses.replace(f, tower=tower(f.tower), bottom=bottom, model=model, stages=stages)
    return dataclasses.replace(cfg, funnel=funnel)
