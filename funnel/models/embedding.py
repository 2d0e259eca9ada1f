"""Embedding tables shared by every stage tower (and, with share_with, by several features)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from funnel.models.inputs import InputShape, TowerInput, module_key


class SharedEmbeddings(nn.Module):
    """Look up every categorical field, pool every sequence, and concatenate with numerics."""

    def __init__(self, layout: dict[str, Any], init_std: float = 0.05, exclude: frozenset[str] = frozenset()):
        """``exclude``: features this module leaves out (the bias tower's own features)."""
        super().__init__()
        fields = [f for f in layout["fields"] if f["name"] not in exclude]
        used = {f["table"] for f in fields}
        self.tables = nn.ModuleDict(
            {module_key(name): nn.Embedding(n, dim) for name, (n, dim) in layout["tables"].items() if name in used}
        )
        for table in self.tables.values():
            nn.init.normal_(table.weight, std=init_std)
        self.cat_fields = [(f["name"], module_key(f["table"]), f["column"]) for f in fields if f["kind"] == "categorical"]
        self.seq_fields = [(f["name"], module_key(f["table"]), f["pooling"]) for f in fields if f["kind"] == "sequence"]
        self.numeric_dim = int(layout["numeric_dim"])
        field_dims = {f["name"]: int(f["dim"]) for f in fields}
        self.shape = InputShape(
            flat_dim=sum(field_dims.values()) + self.numeric_dim, field_dims=field_dims, numeric_dim=self.numeric_dim,
            sequence_fields=tuple(name for name, _, _ in self.seq_fields),
        )

    def forward(self, batch: dict[str, torch.Tensor]) -> TowerInput:
        cat = batch["cat"]  # (B, C)
        fields = {name: self.tables[table](cat[:, col]) for name, table, col in self.cat_fields}  # each (B, E)
        sequences = {}
        for name, table, pooling in self.seq_fields:
            ids = batch[f"seq/{name}"]  # (B, L)
            mask = ids > 0  # id 0 is padding (and unknown items)
            emb = self.tables[table](ids)  # (B, L, E)
            summed = (emb * mask.unsqueeze(-1)).sum(1)  # (B, E)
            if pooling == "mean":
                summed = summed / mask.sum(1, keepdim=True).clamp(min=1)
            fields[name] = summed
            sequences[name] = (emb, mask)
        numeric = batch["num"]  # (B, K)
        flat = torch.cat([*fields.values(), numeric], dim=1)  # (B, flat_dim)
        return TowerInput(flat=flat, fields=fields, numeric=numeric, sequences=sequences)
