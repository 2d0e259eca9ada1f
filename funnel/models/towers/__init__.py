"""Tower registry: the per-stage networks between the shared embeddings and the logit heads.

A tower is an ``nn.Module`` whose constructor takes ``shape: InputShape`` first and its
own keyword arguments after it (these come from YAML: ``tower: {type: mlp, hidden:
[64]}``), that sets ``self.out_dim``, and whose ``forward(x: TowerInput)`` returns a
``(B, out_dim)`` hidden vector. The framework adds the logit head. Register a new one with
``@register_tower("name")``; list its module under ``plugins:`` to use it from YAML.

Built-ins: ``mlp``, ``deepfm``, ``dcn``, ``field_sum``, ``din`` (one file each).
"""

from __future__ import annotations

import inspect

from torch import nn

from funnel.errors import ConfigError, did_you_mean
from funnel.models.inputs import InputShape
from funnel.registry import Registry
from funnel.spec.schema import TowerSpec

TOWERS: Registry[type[nn.Module]] = Registry("tower", "funnel.tower.type")
register_tower = TOWERS.register


def tower_problems(spec: TowerSpec, path: str) -> list[str]:
    """Check a tower spec against the registered constructor's signature."""
    if spec.type not in TOWERS:
        return [TOWERS.unknown(spec.type).replace(TOWERS.yaml_key, f"{path}.type", 1)]
    params = list(inspect.signature(TOWERS.get(spec.type).__init__).parameters.values())[2:]
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params)
    problems = []
    for key in spec.kwargs:
        if key not in names and not takes_any:
            problems.append(
                f"{path}.{key}: tower {spec.type!r} has no argument {key!r}.{did_you_mean(key, names)} "
                f"Its arguments: {', '.join(names) or 'none'}."
            )
    return problems


def build_tower(spec: TowerSpec, shape: InputShape, path: str) -> nn.Module:
    try:
        tower = TOWERS.get(spec.type)(shape, **spec.kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: tower {spec.type!r} rejected its arguments: {exc}") from exc
    if not isinstance(getattr(tower, "out_dim", None), int):
        raise ConfigError(f"{path}: tower {spec.type!r} must set an integer `self.out_dim` in its constructor.")
    return tower


from funnel.models.towers import dcn, deepfm, din, field_sum, mlp  # noqa: F401  (register the built-ins)
