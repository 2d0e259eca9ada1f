"""The MLP tower, and the layer stack every other built-in tower reuses for its deep part."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from funnel.errors import did_you_mean
from funnel.models.inputs import InputShape, TowerInput
from funnel.models.towers import register_tower

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "prelu": nn.PReLU}


def mlp_layers(
    width: int, hidden: Sequence[int], activation: str = "relu", dropout: float = 0.0, batch_norm: bool = False
) -> tuple[nn.Sequential, int]:
    """Linear → [BatchNorm] → activation → [Dropout] per hidden size; returns (layers, out width)."""
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"activation {activation!r} is not one of {', '.join(ACTIVATIONS)}.{did_you_mean(activation, ACTIVATIONS)}"
        )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
    if any(int(h) < 1 for h in hidden):
        raise ValueError(f"hidden sizes must be positive ints, got {list(hidden)}")
    layers: list[nn.Module] = []
    for size in hidden:
        layers.append(nn.Linear(width, int(size)))
        if batch_norm:
            layers.append(nn.BatchNorm1d(int(size)))
        layers.append(ACTIVATIONS[activation]())
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = int(size)
    return nn.Sequential(*layers), width


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
        self.layers, self.out_dim = mlp_layers(shape.flat_dim, hidden, activation, dropout, batch_norm)

    def forward(self, x: TowerInput) -> torch.Tensor:
        return self.layers(x.flat)  # (B, out_dim)
