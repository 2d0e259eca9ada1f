"""A user-written tower, registered under a name and used from YAML.

A tower is any ``nn.Module`` that takes ``shape`` (an ``InputShape``) first and its own
keyword arguments after it, sets ``self.out_dim``, and maps a ``TowerInput`` to a
``(B, out_dim)`` hidden vector; funnel adds the logit head. Its YAML arguments are checked
against this constructor's signature before any data is read.

Use it from any config by importing the module first:

    plugins: [custom_tower]          # or my_package.my_towers: any importable module
    funnel:
      tower: {type: gated_mlp, hidden: [64, 32]}           # every stage ...
      stages:
        - {name: click}
        - {name: conversion, after: click, tower: {type: mlp}}   # ... or one stage

Run this file to train ESMM with it on the synthetic funnel (2 epochs):

    python examples/custom_tower.py
    python examples/custom_tower.py trainer.max_epochs=5 funnel.tower.hidden=[128,64]
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from torch import nn

from funnel.models import register_tower
from funnel.models.inputs import InputShape, TowerInput


@register_tower("gated_mlp")
class GatedMLPTower(nn.Module):
    """An MLP whose input is re-weighted per dimension by a learned sigmoid gate."""

    def __init__(self, shape: InputShape, hidden: Sequence[int] = (64, 32), gate_init: float = 2.0):
        super().__init__()
        self.gate = nn.Linear(shape.flat_dim, shape.flat_dim)
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, gate_init)  # starts almost open: sigmoid(2) = 0.88
        layers: list[nn.Module] = []
        width = shape.flat_dim
        for size in hidden:
            layers += [nn.Linear(width, int(size)), nn.ReLU()]
            width = int(size)
        self.mlp = nn.Sequential(*layers)
        self.out_dim = width

    def forward(self, x: TowerInput) -> torch.Tensor:
        return self.mlp(x.flat * torch.sigmoid(self.gate(x.flat)))


def main(overrides: list[str]) -> int:
    from plugin_demo import fit_with_plugin

    return fit_with_plugin(
        sys.modules[__name__], "custom_tower", ["funnel.tower={type: gated_mlp, hidden: [64, 32]}", *overrides]
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
