"""Dynamic loss weighting across stages, selectable in YAML for every funnel model.

``funnel.loss_weighting: {method: static | uncertainty | dwa | gradnorm}``

- ``static``: Σ_s w_s · L_s with the stages' fixed ``weight`` (the default).
- ``uncertainty`` (Kendall, Gal & Cipolla, CVPR 2018): a learned log-variance s_k per
  stage, Σ_k w_k · exp(-s_k) · L_k + s_k; a noisy (high-loss) task is down-weighted.
- ``dwa`` (Dynamic Weight Average; Liu, Johns & Davison, CVPR 2019): each epoch the weight
  of stage k is K · softmax_k(r_k / T) with r_k = L_k(t-1) / L_k(t-2), the ratio of its
  last two epoch-mean losses; a stage whose loss falls slowly gets more weight. The
  first two epochs use equal weights.
- ``gradnorm`` (Chen et al., ICML 2018): see :class:`GradNormWeighting`.

The weights (times the static ones) are logged every epoch as ``weight/<stage>``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class StaticWeighting(nn.Module):
    learned = False  # the weights change during training (they are logged as weight/<stage>)

    def __init__(self, names: list[str], weights: list[float]):
        super().__init__()
        self.names = names
        self._weights = [float(w) for w in weights]
        self.register_buffer("static", torch.tensor(weights, dtype=torch.float32))
        self.register_load_state_dict_pre_hook(_static_from_config)

    def dynamic(self) -> Tensor:
        return torch.ones_like(self.static)

    def forward(self, parts: dict[str, Tensor]) -> Tensor:
        losses = torch.stack([parts[n] for n in self.names])
        return (self.static.to(losses.dtype) * self.dynamic().to(losses.dtype) * losses).sum()

    def weights(self) -> dict[str, float]:
        w = (self.static * self.dynamic()).detach().cpu().tolist()
        return dict(zip(self.names, w, strict=True))

    def end_epoch(self, epoch_losses: dict[str, float]) -> None:
        """Called with the epoch-mean loss of every stage after each training epoch."""


class UncertaintyWeighting(StaticWeighting):
    learned = True

    def __init__(self, names: list[str], weights: list[float]):
        super().__init__(names, weights)
        self.log_var = nn.Parameter(torch.zeros(len(names)))  # s_k, trained with the model

    def dynamic(self) -> Tensor:
        return torch.exp(-self.log_var)

    def forward(self, parts: dict[str, Tensor]) -> Tensor:
        return super().forward(parts) + self.log_var.sum()


class DWAWeighting(StaticWeighting):
    learned = True

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


class GradNormWeighting(StaticWeighting):
    """GradNorm (Chen et al., ICML 2018) on the shared embedding tables W.

    Weights w_k > 0 (renormalised to sum to K) are learned by L_grad = Σ_k |G_k − Ḡ·r_k^α|,
    where G_k = w_k·‖∇_W L_k‖, r_k = (L_k / L_k(0)) / mean_j(L_j / L_j(0)) and the target is
    held constant; the model itself is trained on Σ_k w_k·L_k with w_k held constant. A
    stage whose gradients on W are small, or whose loss falls slowly, gains weight. The
    returned total includes L_grad (its gradient reaches only the weights).
    """

    learned = True

    def __init__(self, names: list[str], weights: list[float], alpha: float = 1.5):
        super().__init__(names, weights)
        self.alpha = alpha
        self.raw = nn.Parameter(torch.ones(len(names)))
        self.register_buffer("initial", torch.zeros(len(names)))
        self.shared: list[nn.Parameter] = []  # set by the model builder: the shared tables

    def dynamic(self) -> Tensor:
        positive = self.raw.abs().clamp(min=1e-6)
        return len(self.names) * positive / positive.sum()

    def forward(self, parts: dict[str, Tensor]) -> Tensor:
        losses = torch.stack([parts[n] for n in self.names])
        w = self.dynamic()
        model_loss = (self.static.to(losses.dtype) * w.detach().to(losses.dtype) * losses).sum()
        if not (torch.is_grad_enabled() and losses.requires_grad and self.shared):
            return model_loss  # evaluation: nothing to learn
        if not self.initial.any():
            self.initial.copy_(losses.detach())
        norms = []
        for loss in losses:
            grads = torch.autograd.grad(loss, self.shared, retain_graph=True, allow_unused=True)
            norms.append(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None) + 1e-20))
        g = torch.stack(norms).detach()  # ‖∇_W L_k‖
        big_g = w * g  # G_k, differentiable in the weights only
        ratio = losses.detach().float() / self.initial.clamp(min=1e-12)
        target = (big_g.mean() * (ratio / ratio.mean()) ** self.alpha).detach()
        return model_loss + (big_g - target).abs().sum()


def _static_from_config(module: StaticWeighting, state: dict[str, Tensor], prefix: str, *args: object) -> None:
    """The stage weights come from the config: a checkpoint without them (a static run from
    before every model had a weighting module) loads, and one with them is checked."""
    key = f"{prefix}static"
    state.setdefault(key, torch.tensor(module._weights, dtype=torch.float32))


def build_weighting(
    method: str, names: list[str], weights: list[float], temperature: float = 2.0, alpha: float = 1.5
) -> StaticWeighting:
    if method == "gradnorm":
        return GradNormWeighting(names, weights, alpha)
    if method == "uncertainty":
        return UncertaintyWeighting(names, weights)
    if method == "dwa":
        return DWAWeighting(names, weights, temperature)
    return StaticWeighting(names, weights)
