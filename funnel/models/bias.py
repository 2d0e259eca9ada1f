"""The position-bias shallow tower (Zhao et al. 2019, YouTube's multitask ranking).

Bias-only features (display position, device, ...) get their own small embedding tables
and an MLP that outputs one logit. During training it is added to the chosen stage's
logit, so the stage tower learns the position-free relevance; at evaluation and
prediction the term is dropped unless ``keep_at_inference``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from funnel.data.layout import FeatureLayout
from funnel.data.table import CAT
from funnel.models.inputs import module_key
from funnel.models.towers.mlp import mlp_layers


class BiasTower(nn.Module):
    def __init__(
        self,
        layout: FeatureLayout,
        features: Sequence[str],
        hidden: Sequence[int] = (16,),
        keep_at_inference: bool = False,
        feature_dropout: float = 0.0,
        init_std: float = 1.0,  # nn.Embedding's own N(0, 1)
    ):
        super().__init__()
        fields = [layout.field(name) for name in features]  # categorical: validation says so
        self.columns = [(module_key(f.name), f.column) for f in fields]
        self.tables = nn.ModuleDict()
        for f in fields:
            table = layout.table(f.table)
            self.tables[module_key(f.name)] = nn.Embedding(table.rows, table.dim)
            nn.init.normal_(self.tables[module_key(f.name)].weight, std=init_std)
        width = sum(t.embedding_dim for t in self.tables.values())
        layers, out = mlp_layers(width, hidden)
        self.net = nn.Sequential(layers, nn.Linear(out, 1))
        self.keep_at_inference = keep_at_inference
        self.feature_dropout = feature_dropout

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        cat = batch[CAT]
        ids = [cat[:, col] for _, col in self.columns]
        if self.training and self.feature_dropout > 0:  # id 0 is the unknown id
            ids = [i.masked_fill(torch.rand(i.shape, device=i.device) < self.feature_dropout, 0) for i in ids]
        x = torch.cat([self.tables[key](i) for (key, _), i in zip(self.columns, ids, strict=True)], 1)
        return self.net(x).squeeze(-1)  # (B,) logit

    def active(self, training: bool) -> bool:
        return training or self.keep_at_inference
