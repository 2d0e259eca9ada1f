"""Dynamic loss weighting across stages, selectable in YAML for every funnel model.

``funnel.loss_weighting: {method: static | uncertainty | dwa}``

- ``static``: Σ_s w_s · L_s with the stages' fixed ``weight`` (the default).
- ``uncertainty`` (Kendall, Gal & Cipolla, CVPR 2018): a learned log-variance s_k per
  stage, Σ_k w_k · exp(-s_k) · L_k + s_k; a noisy (high-loss) task is down-weighted.
- ``dwa`` (Dynamic Weight Average; Liu, Johns & Davison, CVPR 2019): each epoch the weight
  of stage k is K · softmax_k(r_k / T) with r_k = L_k(t-1) / L_k(t-2), the ratio of its
  last two epoch-mean losses; a stage whose loss falls slowly gets more weight. The
  first two epochs use equal weights.

The weights (times the static ones) are logged every epoch as ``weight/<stage>``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class StaticWeighting(nn.Module):
    def __init__(self, names: list[str], weights: list[float]):
        super().__init__()
        self.names = names
        self.register_buffer("static", torch.tensor(weights, dtype=torch.float32))

    def dynamic(self) -> Tensor:
        return torch.ones_like(self.static)

    def forward(self, parts: dict[str, Tensor]) -> Tensor:
        losses = torch.stack([parts[n] for n in self.names])
        return (self.static.to(losses.dtype) * self.dynamic().to(losses.dtype) * losses).sum()

    def weights(self) -> dict[str, float]:
        w = (self.static * self.dynamic()).detach().cpu().tolist()
        return dict(zip(self.names, w))

    def end_epoch(self, epoch_losses: dict[str, float]) -> None:
        """Called with the epoch-mean loss of every stage after each training epoch."""


class UncertaintyWeighting(StaticWeighting):
    def __init__(self, names: list[str], weights: list[float]):
        super().__init__(names, weights)
        self.log_var = nn.Parameter(torch.zeros(len(names)))  # s_k, trained with the model

    def dynamic(self) -> Tensor:
        return torch.exp(-self.log_var)

    def forward(self, parts: dict[str, Tensor]) -> Tensor:
        return super().forward(parts) + self.log_var.sum()


class DWAWeighting(StaticWeighting):
    def __init__(self, names: list[str], weights: list[float], temperature: float = 2.0):
        super().__init__(names, weights)
        self.temperature = temperature
        self.register_buffer("current", torch.ones(len(names)))
        self.history: list[list[float]] = []

    def dynamic(self) -> Tensor:
        return self.current

    def end_epoch(self, epoch_losses: dict[str, float]) -> None:
        self.history.append([epoch_losses[n] for n in self.names])
        if len(self.history) < 2:
            return
        prev, last = torch.tensor(self.history[-2]), torch.tensor(self.history[-1])
        ratio = last / prev.clamp(min=1e-12)
        self.current.copy_(len(self.names) * torch.softmax(ratio / self.temperature, dim=0))


def build_weighting(method: str, names: list[str], weights: list[float], temperature: float = 2.0) -> StaticWeighting:
    if method == "uncertainty":
        return UncertaintyWeighting(names, weights)
    if method == "dwa":
        return DWAWeighting(names, weights, temperature)
    return StaticWeighting(names, weights)
