"""The ESMM paper's tower input: field-wise element-wise sums per group, concatenated, then an MLP.

``groups: {user: [user_id, user_age_bucket], item: [item_id, item_category]}`` sums the
embeddings of each group's fields (they must share one width); fields in no group and the
numerics are concatenated beside the sums as they are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from funnel.errors import did_you_mean
from funnel.models.inputs import InputShape, TowerInput
from funnel.models.towers import register_tower
from funnel.models.towers.mlp import mlp_layers


@register_tower("field_sum")
class FieldSumTower(nn.Module):
    def __init__(
        self,
        shape: InputShape,
        groups: Mapping[str, Sequence[str]],
        hidden: Sequence[int] = (128, 64),
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
    ):
        super().__init__()
        if not groups:
            raise ValueError("field_sum needs `groups`, e.g. {user: [user_id], item: [item_id, item_category]}")
        fields = list(shape.field_dims)
        problems, seen = [], set()
        for name, members in groups.items():
            if not members:
                problems.append(f"group {name!r} is empty")
            for f in members:
                if f not in shape.field_dims:
                    problems.append(
                        f"group {name!r}: {f!r} is not a categorical or sequence feature.{did_you_mean(f, fields)}"
                    )
                elif f in seen:
                    problems.append(f"group {name!r}: {f!r} is already in another group")
                seen.add(f)
            widths = {shape.field_dims[f] for f in members if f in shape.field_dims}
            if len(widths) > 1:
                problems.append(
                    f"group {name!r}: its fields have embedding widths {sorted(widths)}; a sum needs one width"
                )
        if problems:
            raise ValueError("; ".join(problems))
        self.groups = {k: list(v) for k, v in groups.items()}
        self.rest = [f for f in fields if f not in seen]
        width = sum(shape.field_dims[m[0]] for m in self.groups.values())
        width += sum(shape.field_dims[f] for f in self.rest) + shape.numeric_dim
        self.layers, self.out_dim = mlp_layers(width, hidden, activation, dropout, batch_norm)

    def forward(self, x: TowerInput) -> torch.Tensor:
        sums = [torch.stack([x.fields[f] for f in members], 0).sum(0) for members in self.groups.values()]
        return self.layers(torch.cat([*sums, *(x.fields[f] for f in self.rest), x.numeric], 1))
