"""DeepFM (Guo et al. 2017): factorisation-machine interactions beside an MLP.

Every categorical or pooled-sequence field contributes its embedding v_f, and every numeric
column j a learned vector scaled by its value, x_j·w_j. The FM part is the bi-interaction
vector ½[(Σ_f v_f)² − Σ_f v_f²] (element-wise), whose sum over dimensions is the FM
second-order term Σ_{f<g} <v_f, v_g>. The tower returns [MLP(flat), bi-interaction]; the
stage's linear head weighs both (with equal weights on the bi-interaction it is exactly FM).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from funnel.models.inputs import InputShape, TowerInput
from funnel.models.towers import register_tower
from funnel.models.towers.mlp import mlp_layers


def fm_interaction(v: torch.Tensor) -> torch.Tensor:
    """(B, F, E) field vectors -> (B, E) bi-interaction; ``.sum(-1)`` is Σ_{f<g} <v_f, v_g>."""
    return 0.5 * (v.sum(1).pow(2) - v.pow(2).sum(1))


def field_width(shape: InputShape, tower: str) -> int:
    widths = set(shape.field_dims.values())
    if len(widths) != 1:
        raise ValueError(
            f"{tower} needs every categorical/sequence feature embedded at one width, got "
            f"{dict(shape.field_dims)}; drop the per-feature `embed_dim` overrides or set them equal."
        )
    return widths.pop()


def field_vectors(x: TowerInput, numeric_vectors: torch.Tensor | None) -> torch.Tensor:
    """(B, F, E): every field's vector, then x_j·w_j per numeric column j (``numeric_vectors``
    (K, E), or no numeric fields when None)."""
    vectors = list(x.fields.values())
    if numeric_vectors is not None:
        vectors += list((x.numeric.unsqueeze(-1) * numeric_vectors).unbind(1))
    return torch.stack(vectors, 1)


@register_tower("deepfm")
class DeepFMTower(nn.Module):
    def __init__(
        self,
        shape: InputShape,
        hidden: Sequence[int] = (128, 64),
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
        numeric_in_fm: bool = True,
    ):
        super().__init__()
        width = field_width(shape, "deepfm")
        self.numeric_vectors = None
        if numeric_in_fm and shape.numeric_dim:
            self.numeric_vectors = nn.Parameter(torch.randn(shape.numeric_dim, width) * 0.05)
        self.deep, deep_dim = mlp_layers(shape.flat_dim, hidden, activation, dropout, batch_norm)
        self.out_dim = deep_dim + width

    def field_vectors(self, x: TowerInput) -> torch.Tensor:
        return field_vectors(x, self.numeric_vectors)

    def forward(self, x: TowerInput) -> torch.Tensor:
        return torch.cat([self.deep(x.flat), fm_interaction(self.field_vectors(x))], 1)
