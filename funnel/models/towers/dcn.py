"""DCN-v2 (Wang et al. 2021): a cross network x_{l+1} = x_0 ⊙ (W_l x_l + b_l) + x_l beside an MLP.

``low_rank`` > 0 factors each W_l as U_l V_lᵀ (the paper's cheaper variant). ``structure``:
``parallel`` concatenates the cross output with the MLP's; ``stacked`` feeds it to the MLP.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from funnel.models.inputs import InputShape, TowerInput
from funnel.models.towers import register_tower
from funnel.models.towers.mlp import mlp_layers


class CrossLayer(nn.Module):
    def __init__(self, width: int, low_rank: int = 0):
        super().__init__()
        if low_rank:
            self.w = nn.Sequential(nn.Linear(width, low_rank, bias=False), nn.Linear(low_rank, width))
        else:
            self.w = nn.Linear(width, width)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.w(x) + x


@register_tower("dcn")
class DCNTower(nn.Module):
    def __init__(
        self,
        shape: InputShape,
        cross_layers: int = 2,
        low_rank: int = 0,
        hidden: Sequence[int] = (128, 64),
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
        structure: Literal["parallel", "stacked"] = "parallel",
    ):
        super().__init__()
        if cross_layers < 1 or low_rank < 0:
            raise ValueError(f"cross_layers must be >= 1 and low_rank >= 0, got {cross_layers} and {low_rank}")
        if structure not in ("parallel", "stacked"):
            raise ValueError(f"structure must be 'parallel' or 'stacked', got {structure!r}")
        width = shape.flat_dim
        self.cross = nn.ModuleList(CrossLayer(width, low_rank) for _ in range(cross_layers))
        self.stacked = structure == "stacked"
        self.deep, deep_dim = mlp_layers(width, hidden, activation, dropout, batch_norm)
        self.out_dim = deep_dim if self.stacked else deep_dim + width

    def forward(self, x: TowerInput) -> torch.Tensor:
        x0 = h = x.flat
        for layer in self.cross:
            h = layer(x0, h)
        if self.stacked:
            return self.deep(h)
        return torch.cat([h, self.deep(x0)], 1)
