"""A test plug-in: the MLP tower, which kills its own process with SIGKILL at the N-th training
forward pass when $FUNNEL_TEST_KILL_AT is N (a crash at a known point of a run)."""

from __future__ import annotations

import os
import signal

import torch
from torch import nn

from funnel.models.inputs import InputShape, TowerInput
from funnel.models.towers import register_tower
from funnel.models.towers.mlp import MLPTower


@register_tower("killable_mlp")
class KillableMLP(nn.Module):
    def __init__(self, shape: InputShape, **kwargs):
        super().__init__()
        self.mlp = MLPTower(shape, **kwargs)
        self.out_dim = self.mlp.out_dim
        self.calls = 0

    def forward(self, x: TowerInput) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.calls == int(os.environ.get("FUNNEL_TEST_KILL_AT", "0")):
                os.kill(os.getpid(), signal.SIGKILL)
        return self.mlp(x)
