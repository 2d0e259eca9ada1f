"""Embedding tables shared by every stage tower (and, with share_with, by several features).

The tables of one embedding width are stored as one fused ``nn.Embedding``: each table owns
a block of rows, and a field's ids are shifted by its table's offset. All categorical
fields of a width are then looked up in one call, backpropagated in one call, and the
looked-up block is already the flat input the towers take (no concatenation of one tensor
per field). Checkpoints written with one table per field (``tables.<feature>.weight``) still
load.

The lookup's backward is a zero-filled gradient plus one ``index_add_`` (or, for
``optim.sparse_embeddings``, the sparse gradient itself). Measured on the speed issue's 20
tables, batch 1024: 0.9 ms, against 3.5 ms for ``nn.Embedding``'s dense backward on the
fused table and 1.8 ms for one backward per table. The results are the same.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from funnel.data.layout import FeatureLayout
from funnel.data.table import CAT, NUM, SEQ, seq_key
from funnel.models.inputs import InputShape, TowerInput, module_key


class _Lookup(torch.autograd.Function):
    """``weight[ids]`` whose backward scatters the gradient rows with one ``index_add_``."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, ids: Tensor, sparse: bool) -> Tensor:
        ctx.save_for_backward(ids)
        ctx.weight_shape, ctx.weight_dtype, ctx.sparse = weight.shape, weight.dtype, sparse
        return weight.index_select(0, ids.reshape(-1)).view(*ids.shape, weight.shape[1])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (ids,) = ctx.saved_tensors
        flat_ids, rows = ids.reshape(-1), grad.reshape(-1, ctx.weight_shape[1]).to(ctx.weight_dtype)
        if ctx.sparse:  # what nn.Embedding(sparse=True) gives: uncoalesced (id, row) pairs
            # ids are in range: the forward's index_select checked them
            grad_weight = torch.sparse_coo_tensor(flat_ids.unsqueeze(0), rows, ctx.weight_shape, check_invariants=False)
            return grad_weight, None, None
        dense = torch.zeros(ctx.weight_shape, dtype=ctx.weight_dtype, device=grad.device)
        return dense.index_add_(0, flat_ids, rows), None, None


def lookup(table: nn.Embedding, ids: Tensor) -> Tensor:
    """``table(ids)`` with the faster backward of ``_Lookup`` (ids: any shape → (*shape, E))."""
    return _Lookup.apply(table.weight, ids, table.sparse)


class SharedEmbeddings(nn.Module):
    """Look up every categorical field, pool every sequence, and concatenate with numerics."""

    def __init__(self, layout: FeatureLayout, init_std: float = 0.05, exclude: frozenset[str] = frozenset()):
        """``exclude``: features this module leaves out (the bias tower's own features)."""
        super().__init__()
        fields = [f for f in layout.fields if f.name not in exclude]
        used = {f.table for f in fields}
        # table name -> (width key, first row, rows), in layout order
        self.slots: dict[str, tuple[str, int, int]] = {}
        rows_per_width: dict[str, int] = {}
        for t in layout.tables:
            if t.name in used:
                key = f"d{t.dim}"
                self.slots[t.name] = (key, rows_per_width.get(key, 0), t.rows)
                rows_per_width[key] = rows_per_width.get(key, 0) + t.rows
        self.fused = nn.ModuleDict({key: nn.Embedding(rows, int(key[1:])) for key, rows in rows_per_width.items()})
        for table in self.fused.values():
            nn.init.normal_(table.weight, std=init_std)
        cats = [f for f in fields if f.block == CAT]
        self.cat_names = [f.name for f in cats]
        # per width: (field names, their columns of batch[CAT], their tables' offsets)
        self.cat_groups: dict[str, tuple[list[str], list[int], list[int]]] = {}
        for f in cats:
            key, offset, _ = self.slots[f.table]
            names, columns, offsets = self.cat_groups.setdefault(key, ([], [], []))
            names.append(f.name)
            columns.append(f.column)
            offsets.append(offset)
        self.seq_fields = [(f.name, f.table, f.pooling) for f in fields if f.block == SEQ]
        self.numeric_dim = layout.numeric_dim
        field_dims = {f.name: f.dim for f in fields}
        self.shape = InputShape(
            flat_dim=sum(field_dims.values()) + self.numeric_dim,
            field_dims=field_dims,
            numeric_dim=self.numeric_dim,
            sequence_fields=tuple(name for name, _, _ in self.seq_fields),
        )
        self._index: dict[tuple[str, torch.device], tuple[Tensor | None, Tensor]] = {}  # per device, built lazily
        self.register_load_state_dict_pre_hook(_from_per_table_checkpoint)

    # ---- the tables, by name --------------------------------------------------------------------
    @property
    def table_names(self) -> tuple[str, ...]:
        return tuple(self.slots)

    def table_weight(self, name: str) -> Tensor:
        """The rows of table ``name`` (a view of the fused weight)."""
        key, offset, rows = self.slots[name]
        return self.fused[key].weight[offset : offset + rows]

    def table_grad(self, name: str) -> Tensor | None:
        """The gradient of table ``name``'s rows, after a backward pass (dense gradients)."""
        key, offset, rows = self.slots[name]
        grad = self.fused[key].weight.grad
        return None if grad is None else grad[offset : offset + rows]

    # ---- lookup ---------------------------------------------------------------------------------
    def _ids(self, key: str, cat: Tensor) -> Tensor:
        """Ids of width ``key``'s fields, shifted into the fused table: (B, fields)."""
        cache_key = (key, cat.device)
        if cache_key not in self._index:
            _, columns, offsets = self.cat_groups[key]
            everything = columns == list(range(cat.shape[1]))
            self._index[cache_key] = (
                None if everything else torch.tensor(columns, device=cat.device),
                torch.tensor(offsets, device=cat.device),
            )
        columns, offsets = self._index[cache_key]
        return (cat if columns is None else cat.index_select(1, columns)) + offsets

    def _lookup(self, table: str, ids: Tensor) -> Tensor:
        key, offset, _ = self.slots[table]
        return lookup(self.fused[key], ids + offset)

    def forward(self, batch: dict[str, Tensor]) -> TowerInput:
        cat = batch[CAT]  # (B, C)
        blocks = {key: lookup(self.fused[key], self._ids(key, cat)) for key in self.cat_groups}  # (B, fields, E)
        fields = {
            name: blocks[key][:, i] for key, (names, _, _) in self.cat_groups.items() for i, name in enumerate(names)
        }
        fields = {name: fields[name] for name in self.cat_names}  # in feature order
        # one width: the looked-up block is already the fields side by side
        flat_parts = [next(iter(blocks.values())).flatten(1)] if len(blocks) == 1 else list(fields.values())
        sequences = {}
        for name, table, pooling in self.seq_fields:
            ids = batch[seq_key(name)]  # (B, L)
            mask = ids > 0  # id 0 is padding (and unknown items)
            emb = self._lookup(table, ids)  # (B, L, E)
            summed = (emb * mask.unsqueeze(-1)).sum(1)  # (B, E)
            if pooling == "mean":
                summed = summed / mask.sum(1, keepdim=True).clamp(min=1)
            fields[name] = summed
            flat_parts.append(summed)
            sequences[name] = (emb, mask)
        numeric = batch[NUM]  # (B, K)
        flat = torch.cat([*flat_parts, numeric], dim=1)  # (B, flat_dim)
        return TowerInput(flat=flat, fields=fields, numeric=numeric, sequences=sequences)


def _from_per_table_checkpoint(module: SharedEmbeddings, state: dict[str, Tensor], prefix: str, *args: Any) -> None:
    """Stack a checkpoint's per-table weights (``tables.m_<name>.weight``, the layout before the
    fused tables) into the fused ones, so that runs trained before still load."""
    old = {name: f"{prefix}tables.{module_key(name)}.weight" for name in module.slots}
    if not all(k in state for k in old.values()):
        return
    for key in module.fused:
        names = [n for n, slot in module.slots.items() if slot[0] == key]  # in row order
        state[f"{prefix}fused.{key}.weight"] = torch.cat([state.pop(old[n]) for n in names])
