"""NFwFM: field-weighted factorisation machine (Pan et al., WWW 2018) beside an MLP.

FwFM is FM with one learned weight per pair of fields: the second-order term is
Σ_{f<g} r_fg <v_f, v_g>, so that pairs that matter little (say device × hour) can be turned
down while the embeddings stay shared. As in ``deepfm``, every categorical or pooled-sequence
field contributes its embedding v_f and every numeric column j a learned vector scaled by its
value, x_j·w_j. Meitu's multi-task NFwFM puts a neural part beside it; here that is an MLP
over ``flat``.

The tower returns [MLP(flat), FwFM] and the stage's linear head weighs both:

- ``interaction: vector`` (default): the weighted bi-interaction Σ_{f<g} r_fg (v_f ⊙ v_g),
  one value per embedding dimension, whose sum is the FwFM term (deepfm's convention);
- ``interaction: scalar``: the FwFM term itself, one column.

With ``first_order: true`` one more column holds the linear term Σ_f <w_f, v_f> (the paper's
FeVec first order: a learned vector per field dotted with its vector; for a numeric column
that is x_j <w_j, ·>, linear in its value).
The pairs are computed at once: the (B, F, F) Gram matrix (or its (B, F, F, E) per-dimension
version) times the learned (F, F) weights, upper triangle only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from funnel.models.inputs import InputShape, TowerInput
from funnel.models.towers import register_tower
from funnel.models.towers.deepfm import field_vectors, field_width
from funnel.models.towers.mlp import mlp_layers


def fwfm_interaction(v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """(B, F, E) field vectors and (F, F) pair weights (upper triangle read) -> (B, E)
    weighted bi-interaction Σ_{f<g} r_fg (v_f ⊙ v_g); ``.sum(-1)`` is the FwFM term."""
    # Σ_{f<g} r_fg v_f ⊙ v_g = Σ_f v_f ⊙ (Σ_{g>f} r_fg v_g): one (F, F) @ (B, F, E) product
    upper = torch.triu(r, diagonal=1)
    return (v * torch.matmul(upper, v)).sum(1)


@register_tower("nfwfm")
class NFwFMTower(nn.Module):
    def __init__(
        self,
        shape: InputShape,
        hidden: Sequence[int] = (128, 64),
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
        numeric_in_fm: bool = True,
        interaction: Literal["vector", "scalar"] = "vector",
        first_order: bool = False,
    ):
        super().__init__()
        if interaction not in ("vector", "scalar"):
            raise ValueError(f"interaction must be 'vector' or 'scalar', got {interaction!r}")
        width = field_width(shape, "nfwfm")
        n_numeric = shape.numeric_dim if numeric_in_fm else 0
        n_fields = len(shape.field_dims) + n_numeric
        if n_fields < 2:
            raise ValueError(
                f"nfwfm needs at least two fields to pair, got {n_fields} "
                f"({list(shape.field_dims)} and {n_numeric} numeric); add features or use `mlp`"
            )
        self.numeric_vectors = nn.Parameter(torch.randn(n_numeric, width) * 0.05) if n_numeric else None
        # r_fg starts at 1 (plain FM) and is learned; only the strict upper triangle is used
        self.pair_weights = nn.Parameter(torch.ones(n_fields, n_fields))
        self.first = None
        if first_order:
            self.first = nn.Parameter(torch.randn(n_fields, width) * 0.05)
        self.vector = interaction == "vector"
        self.deep, deep_dim = mlp_layers(shape.flat_dim, hidden, activation, dropout, batch_norm)
        self.out_dim = deep_dim + (width if self.vector else 1) + (1 if first_order else 0)

    def field_vectors(self, x: TowerInput) -> torch.Tensor:
        return field_vectors(x, self.numeric_vectors)  # (B, F, E)

    def forward(self, x: TowerInput) -> torch.Tensor:
        v = self.field_vectors(x)
        pairs = fwfm_interaction(v, self.pair_weights)  # (B, E)
        parts = [self.deep(x.flat), pairs if self.vector else pairs.sum(1, keepdim=True)]
        if self.first is not None:
            parts.append((v * self.first).sum((1, 2)).unsqueeze(1))  # (B, 1)
        return torch.cat(parts, 1)
