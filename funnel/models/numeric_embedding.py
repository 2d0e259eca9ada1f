"""Periodic embeddings of numeric features (``embedding: plr``).

Gorishniy, Rubachev and Babenko, "On Embeddings for Numerical Features in Tabular Deep Learning"
(NeurIPS 2022), PLR: a scalar x becomes

    v = [sin(2π c x), cos(2π c x)]    c ∈ R^k trainable, initialised N(0, σ²)   (periodic, P)
    e = ReLU(W v + b)                 W: (E, 2k)                                (linear, L; ReLU, R)

so that an MLP over ``e`` sees a smooth but high-frequency function of x, which closes much of the
gap with gradient-boosted trees on tabular data. σ is the one sensitive choice: it sets how fine
the detail the frequencies start from is (x is the standardised value, so σ is in standard
deviations⁻¹). Each feature has its own c, W and b.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class PeriodicEmbedding(nn.Module):
    """x (B,) → ReLU(Linear([sin, cos](2π c·x))) (B, dim)."""

    def __init__(self, frequencies: int, dim: int, sigma: float):
        super().__init__()
        self.frequencies = nn.Parameter(torch.randn(frequencies) * sigma)  # (k,)
        self.linear = nn.Linear(2 * frequencies, dim)

    def forward(self, x: Tensor) -> Tensor:
        angles = 2 * math.pi * self.frequencies * x.unsqueeze(-1)  # (B, k)
        return torch.relu(self.linear(torch.cat([torch.sin(angles), torch.cos(angles)], -1)))  # (B, dim)
