"""The built-in funnel models: ESMM (entire-space path losses) and BASE (its baseline)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from funnel.graph import FunnelGraph
from funnel.models.losses import bce_from_log_prob, masked_mean
from funnel.models.net import FunnelNet, FunnelOutput
from funnel.models.registry import FunnelModel, LossResult, register_model
from funnel.spec.schema import FunnelSpec


class EntireSpaceLoss:
    """Σ_s w_s · mean over ALL impressions of BCE(P(reach s), y_s).

    Only path probabilities are supervised: a conditional tower (pCVR) learns through
    the product, never from a loss on the clicked subset (ESMM, Ma et al. 2018).
    """

    def __init__(self, graph: FunnelGraph):
        self.names = graph.names
        self.weights = [s.weight for s in graph.stages]

    def __call__(self, out: FunnelOutput, labels: Tensor) -> LossResult:
        parts = {
            name: bce_from_log_prob(out.log_reach[name], labels[:, j]).mean() for j, name in enumerate(self.names)
        }
        total = sum(w * parts[n] for w, n in zip(self.weights, self.names))
        return LossResult(total=total, parts=parts)


class ConditionalSubsetLoss:
    """BASE: each tower's own BCE, only on rows where its parent stage happened.

    The first stage trains on all impressions (its parent is the impression); pCVR
    trains on clicked rows only, exactly the sample-selection-biased setup that the
    ESMM paper compares against. Predictions still multiply along the path.
    """

    def __init__(self, graph: FunnelGraph):
        for stage in graph.stages:
            if len(stage.edges) != 1 or stage.edges[0].negated:
                raise ValueError(f"model base supports chains only; stage {stage.name!r} has branches")
        self.stages = [(j, s.name, s.edges[0].tower, graph.index(s.after) if s.after else None, s.weight)
                       for j, s in enumerate(graph.stages)]

    def __call__(self, out: FunnelOutput, labels: Tensor) -> LossResult:
        parts = {}
        for j, name, tower, parent, _ in self.stages:
            per_row = F.binary_cross_entropy_with_logits(out.logits[tower], labels[:, j], reduction="none")
            mask = torch.ones_like(per_row, dtype=torch.bool) if parent is None else labels[:, parent] > 0
            parts[name] = masked_mean(per_row, mask)
        total = sum(w * parts[name] for _, name, _, _, w in self.stages)
        return LossResult(total=total, parts=parts)


@register_model("esmm")
def build_esmm(graph: FunnelGraph, spec: FunnelSpec, layout: dict[str, Any]) -> FunnelModel:
    share = True if spec.share_embeddings is None else spec.share_embeddings
    return FunnelModel(FunnelNet(graph, spec, layout, share_embeddings=share), EntireSpaceLoss(graph))


@register_model("base")
def build_base(graph: FunnelGraph, spec: FunnelSpec, layout: dict[str, Any]) -> FunnelModel:
    share = False if spec.share_embeddings is None else spec.share_embeddings
    return FunnelModel(FunnelNet(graph, spec, layout, share_embeddings=share), ConditionalSubsetLoss(graph))
