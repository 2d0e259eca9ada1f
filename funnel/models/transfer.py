"""AITM's Adaptive Information Transfer (Xi et al., KDD 2021) between adjacent stages.

For stage t with tower output q_t (B, k) and the previous stage's fused representation
z_{t-1}: p_{t-1} = transfer_MLP(z_{t-1}) is what stage t-1 passes on, then an attention
over the two candidates u ∈ {p_{t-1}, q_t} with three k×k projections h1, h2, h3:

    w_u = softmax_u( <h2(u), h3(u)> / √k ),    z_t = Σ_u w_u · h1(u)

The first stage has nothing to receive: z_1 = q_1. The logit head reads z_t.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class AdaptiveTransfer(nn.Module):
    """One AIT unit: fuses what the previous stage transfers with this stage's own output."""

    def __init__(self, dim: int):
        super().__init__()
        self.transfer = nn.Sequential(nn.Linear(dim, dim), nn.ReLU())  # p_{t-1} from z_{t-1}
        self.h1 = nn.Linear(dim, dim, bias=False)
        self.h2 = nn.Linear(dim, dim, bias=False)
        self.h3 = nn.Linear(dim, dim, bias=False)
        self.scale = 1.0 / math.sqrt(dim)
        self.last_weights: Tensor | None = None  # (B, 2) attention on [p_{t-1}, q_t], for inspection

    def forward(self, z_prev: Tensor, q: Tensor) -> Tensor:
        u = torch.stack([self.transfer(z_prev), q], dim=1)  # (B, 2, k)
        score = (self.h2(u) * self.h3(u)).sum(-1) * self.scale  # (B, 2)
        w = torch.softmax(score, dim=1)  # (B, 2)
        self.last_weights = w.detach()
        return (w.unsqueeze(-1) * self.h1(u)).sum(1)  # (B, k)
