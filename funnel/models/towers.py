"""Tower registry and the built-in MLP tower.

A tower is an ``nn.Module`` whose constructor takes ``shape: InputShape`` first and its
own keyword arguments after it (these come from YAML: ``tower: {type: mlp, hidden:
[64]}``), that sets ``self.out_dim``, and whose ``forward(x: TowerInput)`` returns a
``(B, out_dim)`` hidden vector. The framework adds the logit head.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import nn

from funnel.errors import did_you_mean
from funnel.models.inputs import InputShape, TowerInput
from funnel.registry import Registry
from funnel.spec.schema import TowerSpec

TOWERS: Registry[type[nn.Module]] = Registry("tower", "funnel.tower.type")
register_tower = TOWERS.register

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "prelu": nn.PReLU}


@register_tower("mlp")
class MLPTower(nn.Module):
    """Fully connected layers over the concatenated embeddings and numerics."""

    def __init__(
        self,
        shape: InputShape,
        hidden: Sequence[int] = (128, 64),
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"activation {activation!r} is not one of {', '.join(ACTIVATIONS)}.{did_you_mean(activation, ACTIVATIONS)}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        layers: list[nn.Module] = []
        width = shape.flat_dim
        for size in hidden:
            layers.append(nn.Linear(width, int(size)))
            if batch_norm:
                layers.append(nn.BatchNorm1d(int(size)))
            layers.append(ACTIVATIONS[activation]())
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = int(size)
        self.layers = nn.Sequential(*layers)
        self.out_dim = width

    def forward(self, x: TowerInput) -> torch.Tensor:
        return self.layers(x.flat)  # (B, out_dim)


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
    from funnel.errors import ConfigError

    try:
        tower = TOWERS.get(spec.type)(shape, **spec.kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: tower {spec.type!r} rejected its arguments: {exc}") from exc
    if not isinstance(getattr(tower, "out_dim", None), int):
        raise ConfigError(f"{path}: tower {spec.type!r} must set an integer `self.out_dim` in its constructor.")
    return tower
