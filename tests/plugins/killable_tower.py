"""A test plug-in: the MLP tower, which kills its own process with SIGKILL at the N-th training
forward pass when $FUNNEL_TEST_KILL_AT is N (a crash at a known point of a run). With
$FUNNEL_TEST_KILL_AFTER set to a path, the kill waits (up to 120 s) until that file exists:
checkpoints are written in the background, so a crash right after an epoch end may come before
its last.ckpt is on disk, and a test of resuming from it must not race that write."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

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
                after = os.environ.get("FUNNEL_TEST_KILL_AFTER")
                deadline = time.monotonic() + 120
                while after and not Path(after).exists() and time.monotonic() < deadline:
                    time.sleep(0.05)  # the background writer runs meanwhile
                os.kill(os.getpid(), signal.SIGKILL)
        return self.mlp(x)
