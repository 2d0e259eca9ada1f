"""Numerically stable binary cross-entropy from log-probabilities.

Path probabilities are products of several sigmoids, so they are carried as logs
(sums of logsigmoid) and the loss never forms a probability that could round to 0 or 1.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Largest log-probability used for log(1 - p): keeps log1mexp finite when p rounds to 1.
_LOG_P_MAX = -1e-30
_LN_HALF = -math.log(2.0)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -ln 2 (Mächler 2012)."""
    x = x.clamp(max=_LOG_P_MAX)
    near_zero = x > _LN_HALF
    # each branch only sees inputs where it is accurate, so the unused branch's
    # gradient is finite and torch.where cannot turn 0 * inf into NaN
    a = torch.log(-torch.expm1(torch.where(near_zero, x, torch.full_like(x, _LN_HALF))))
    b = torch.log1p(-torch.exp(torch.where(near_zero, torch.full_like(x, _LN_HALF), x)))
    return torch.where(near_zero, a, b)


def bce_from_log_prob(log_p: Tensor, target: Tensor) -> Tensor:
    """Element-wise -[y·log p + (1-y)·log(1-p)] given log p (any shape)."""
    return -(target * log_p + (1.0 - target) * log1mexp(log_p))


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean over rows where mask is true, or weighted by a float mask (row weights);
    0 (with a gradient path) when no row counts."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)
