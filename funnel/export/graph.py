"""The exportable graph: a run's model with positional, named tensors in and one tensor per
prediction column out, so that ONNX and TorchScript (which take no dicts) can hold it.

Inputs, in this order (only those the run's features need):

| name | dtype | shape | holds |
| --- | --- | --- | --- |
| ``cat`` | int64 | (B, C) | one id column per categorical feature, in feature order |
| ``num`` | float32 | (B, K) | the numeric columns (standardised values, missing flags) |
| ``seq__<name>`` | int64 | (B, L) | a sequence feature's ids, right-aligned, 0 = padding |
| ``bag__<name>__ids`` | int64 | (nnz,) | a multi-hot feature's ids, rows end to end |
| ``bag__<name>__offsets`` | int64 | (B + 1,) | row i is ``ids[offsets[i]:offsets[i+1]]`` |
| ``bag__<name>__weights`` | float32 | (nnz,) | per-id weights (a feature with ``weights`` only) |

Outputs: ``prediction_columns(graph)``, the columns of `funnel predict`, each (B,) float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from funnel.data.layout import FeatureLayout
from funnel.data.table import BAG, CAT, NUM, SEQ, bag_key, bag_offsets_key, bag_weights_key, seq_key
from funnel.inference import _branch_columns, prediction_columns
from funnel.models.registry import FunnelModel


@dataclass(frozen=True)
class GraphInput:
    """One positional input of the exported graph and the batch key it fills."""

    name: str  # the graph's input name
    key: str  # the batch key (funnel/data/table.py)
    dtype: str  # "int64" | "float32"
    shape: tuple[str | int, ...]  # symbolic axes ("batch", "batch+1", "nnz_<name>") and fixed widths


def graph_inputs(layout: FeatureLayout, seq_lengths: dict[str, int]) -> list[GraphInput]:
    """The inputs a model over ``layout`` takes; ``seq_lengths``: each sequence's padded length."""
    n_cat = len(layout.fields_in(CAT))
    inputs = [
        GraphInput("cat", CAT, "int64", ("batch", n_cat)),
        GraphInput("num", NUM, "float32", ("batch", layout.numeric_dim)),
    ]
    for f in layout.fields_in(SEQ):
        inputs.append(GraphInput(f"seq__{f.name}", seq_key(f.name), "int64", ("batch", seq_lengths[f.name])))
    for f in layout.fields_in(BAG):
        inputs.append(GraphInput(f"bag__{f.name}__ids", bag_key(f.name), "int64", (f"nnz_{f.name}",)))
        inputs.append(GraphInput(f"bag__{f.name}__offsets", bag_offsets_key(f.name), "int64", ("batch+1",)))
        if f.weighted:
            inputs.append(GraphInput(f"bag__{f.name}__weights", bag_weights_key(f.name), "float32", (f"nnz_{f.name}",)))
    return inputs


class ExportGraph(nn.Module):
    """``model`` as a function of positional tensors (``inputs`` order) returning the
    prediction columns (``self.outputs`` order), computed exactly as ``predict_table`` does."""

    def __init__(self, model: FunnelModel, inputs: list[GraphInput]):
        super().__init__()
        self.model = model
        self.keys = [i.key for i in inputs]
        self.stages = list(model.graph.names)
        self.branches = list(_branch_columns(model.graph).values())  # the tower of each branch column
        self.outputs = prediction_columns(model.graph)

    def forward(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        logits, _ = self.model.edge_logits(dict(zip(self.keys, tensors, strict=True)))
        return output_columns(self.model, logits, self.stages, self.branches)


def output_columns(model: FunnelModel, logits: dict[str, Tensor], stages: list[str], branches: list[str]):
    """The prediction columns from the edge logits: p_<stage> and p_<stage>_cond per stage, then
    the branch towers' probabilities (``prediction_columns``' order)."""
    out = model.compose({k: v.float() for k, v in logits.items()})
    cols = [p for s in stages for p in (out.log_reach[s].exp(), out.log_cond[s].exp())]
    return (*cols, *(torch.sigmoid(out.logits[t]) for t in branches))
