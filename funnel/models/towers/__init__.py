"""Tower registry: the per-stage networks between the shared embeddings and the logit heads.

A tower is an ``nn.Module`` whose constructor takes ``shape: InputShape`` first and its
own keyword arguments after it (these come from YAML: ``tower: {type: mlp, hidden:
[64]}``), that sets ``self.out_dim``, and whose ``forward(x: TowerInput)`` returns a
``(B, out_dim)`` hidden vector. The framework adds the logit head. Register a new one with
``@register_tower("name")``; list its module under ``plugins:`` to use it from YAML.

Built-ins: ``mlp``, ``deepfm``, ``dcn``, ``field_sum``, ``din``, ``nfwfm``, ``dupn`` (one file each).
"""

from __future__ import annotations

from torch import nn

from funnel.errors import ConfigError
from funnel.models.inputs import InputShape
from funnel.registry import Registry, argument_problems
from funnel.spec.schema import TowerSpec

TOWERS: Registry[type[nn.Module]] = Registry("tower", "funnel.tower.type")
register_tower = TOWERS.register


def tower_problems(spec: TowerSpec, path: str) -> list[str]:
    """Check a tower spec against the registered constructor's signature."""
    if spec.type not in TOWERS:
        return [TOWERS.unknown(spec.type).replace(TOWERS.yaml_key, f"{path}.type", 1)]
    return argument_problems(TOWERS.get(spec.type), spec.kwargs, 2, path, f"tower {spec.type!r}")


def build_tower(spec: TowerSpec, shape: InputShape, path: str) -> nn.Module:
    try:
        tower = TOWERS.get(spec.type)(shape, **spec.kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: tower {spec.type!r} rejected its arguments: {exc}") from exc
    if not isinstance(getattr(tower, "out_dim", None), int):
        raise ConfigError(f"{path}: tower {spec.type!r} must set an integer `self.out_dim` in its constructor.")
    return tower


from funnel.models.towers import dcn, deepfm, din, dupn, field_sum, mlp, nfwfm  # noqa: E402, F401  (register the built-ins)
