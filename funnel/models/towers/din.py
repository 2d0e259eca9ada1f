"""DIN (Zhou et al. 2018): attention of the candidate item over a behaviour sequence.

For each history position k with embedding h_k and the candidate's embedding q, an
attention MLP scores [q, h_k, q − h_k, q ⊙ h_k]; padding positions are masked out. The
weighted sum of the history (softmax weights by default, or the paper's unnormalised
scores with ``normalize: none``) is concatenated with all fields and numerics and fed to an MLP.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from funnel.errors import did_you_mean
from funnel.models.inputs import InputShape, TowerInput
from funnel.models.towers import register_tower
from funnel.models.towers.mlp import mlp_layers


def history_feature(shape: InputShape, sequence: str | None, needs: str) -> str:
    """The sequence feature a tower reads: ``sequence``, or the only one when not given
    (``needs``: what the error says when there is not exactly one)."""
    seqs = list(shape.sequence_fields)
    if sequence is None:
        if len(seqs) != 1:
            raise ValueError(f"{needs} (sequence features: {seqs or 'none'})")
        return seqs[0]
    if sequence not in seqs:
        raise ValueError(f"sequence {sequence!r} is not a `kind: sequence` feature.{did_you_mean(sequence, seqs)}")
    return sequence


@register_tower("din")
class DINTower(nn.Module):
    def __init__(
        self,
        shape: InputShape,
        sequence: str | None = None,
        target: str = "item_id",
        attention: Sequence[int] = (64, 32),
        hidden: Sequence[int] = (128, 64),
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
        normalize: Literal["softmax", "none"] = "softmax",
    ):
        super().__init__()
        seqs = list(shape.sequence_fields)
        sequence = history_feature(
            shape, sequence, "din needs `sequence`: the behaviour-history feature to attend over"
        )
        if target not in shape.field_dims or target in seqs:
            cats = [f for f in shape.field_dims if f not in seqs]
            raise ValueError(f"target {target!r} is not a categorical feature.{did_you_mean(target, cats)}")
        width = shape.field_dims[sequence]
        if shape.field_dims[target] != width:
            raise ValueError(
                f"target {target!r} ({shape.field_dims[target]}) and sequence {sequence!r} ({width}) "
                "need one embedding width; share the table with `share_with`"
            )
        if normalize not in ("softmax", "none"):
            raise ValueError(f"normalize must be 'softmax' or 'none', got {normalize!r}")
        self.sequence, self.target, self.softmax = sequence, target, normalize == "softmax"
        att, att_dim = mlp_layers(4 * width, attention, "prelu" if activation == "relu" else activation)
        self.attention = nn.Sequential(att, nn.Linear(att_dim, 1))
        self.layers, self.out_dim = mlp_layers(shape.flat_dim + width, hidden, activation, dropout, batch_norm)

    def attend(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """query (B, E), keys (B, L, E), mask (B, L) True on real items -> (B, E)."""
        q = query.unsqueeze(1).expand_as(keys)
        scores = self.attention(torch.cat([q, keys, q - keys, q * keys], -1)).squeeze(-1)  # (B, L)
        if self.softmax:
            scores = scores.masked_fill(~mask, float("-inf"))
            weights = torch.softmax(scores, 1).nan_to_num(0.0)  # an all-padding row attends to nothing
        else:
            weights = scores * mask
        return (weights.unsqueeze(-1) * keys).sum(1)

    def forward(self, x: TowerInput) -> torch.Tensor:
        keys, mask = x.sequences[self.sequence]
        interest = self.attend(x.fields[self.target], keys, mask)
        return self.layers(torch.cat([x.flat, interest], 1))
