"""The built-in funnel models: ESMM and the ablation baselines of the ESMM paper.

| model     | towers give          | trained on                                  | embeddings |
| esmm      | conditional p        | path BCE, all impressions                   | shared     |
| esmm_ns   | conditional p        | path BCE, all impressions                   | per tower  |
| division  | path p directly      | path BCE, all impressions; cond = ratio     | per tower  |
| base      | conditional p        | own BCE on parent-positive rows             | per tower  |
| naive     | conditional p        | own BCE on all rows (unclicked = negative)  | per tower  |
"""

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

    def __init__(self, graph: FunnelGraph, calibrator: float = 0.0):
        self.names = graph.names
        self.weights = [s.weight for s in graph.stages]
        self.calibrator = calibrator  # AITM's α; only meaningful when heads predict paths directly
        self.parents = [(s.name, s.after) for s in graph.stages if s.after is not None]

    def __call__(self, out: FunnelOutput, labels: Tensor) -> LossResult:
        parts = {name: bce_from_log_prob(out.log_reach[name], labels[:, j]).mean() for j, name in enumerate(self.names)}
        total = sum(w * parts[n] for w, n in zip(self.weights, self.names, strict=True))
        extra = {}
        if self.calibrator > 0 and self.parents:
            # α · mean over the batch of Σ_t max(ŷ_t − ŷ_parent(t), 0): a later stage may not be likelier
            gaps = sum((out.log_reach[c].exp() - out.log_reach[p].exp()).clamp(min=0) for c, p in self.parents)
            extra["calibrator"] = self.calibrator * gaps.mean()
            total = total + extra["calibrator"]
        return LossResult(total=total, parts=parts, extra=extra)


class ConditionalSubsetLoss:
    """BASE: each tower's own BCE, only on rows where its parent stage happened.

    The first stage trains on all impressions (its parent is the impression); pCVR
    trains on clicked rows only, exactly the sample-selection-biased setup that the
    ESMM paper compares against. Predictions still multiply along the path.
    ``oversample`` = k counts every positive of a conditional tower k times, which is
    exactly the loss of a sample where each positive row is duplicated k times.
    """

    def __init__(self, graph: FunnelGraph, oversample: float = 1.0):
        _chain_only(graph, type(self).__name__)
        self.oversample = oversample
        self.stages = [
            (j, s.name, s.edges[0].tower, graph.index(s.after) if s.after else None, s.weight)
            for j, s in enumerate(graph.stages)
        ]

    def row_mask(self, labels: Tensor, parent: int | None) -> Tensor:
        return torch.ones_like(labels[:, 0], dtype=torch.bool) if parent is None else labels[:, parent] > 0

    def __call__(self, out: FunnelOutput, labels: Tensor) -> LossResult:
        parts = {}
        for j, name, tower, parent, _ in self.stages:
            y = labels[:, j]
            per_row = F.binary_cross_entropy_with_logits(out.logits[tower], y, reduction="none")
            weight = self.row_mask(labels, parent).to(per_row.dtype)
            if parent is not None and self.oversample != 1.0:
                weight = weight * torch.where(y > 0, self.oversample, 1.0)
            parts[name] = masked_mean(per_row, weight)
        total = sum(w * parts[name] for _, name, _, _, w in self.stages)
        return LossResult(total=total, parts=parts)


class ObservedLabelLoss(ConditionalSubsetLoss):
    """NAIVE: every tower's BCE against its own stage label over ALL impressions.

    The conversion tower thus learns p(conversion | impression) and is then used as if it
    were p(conversion | click): the textbook mistake of treating unclicked impressions as
    negatives of a conditional stage. Kept as a baseline to measure that mistake.
    """

    def row_mask(self, labels: Tensor, parent: int | None) -> Tensor:
        return torch.ones_like(labels[:, 0], dtype=torch.bool)


def _share(spec: FunnelSpec, default: bool) -> bool:
    return default if spec.share_embeddings is None else spec.share_embeddings


def _entire_space(
    graph: FunnelGraph, spec: FunnelSpec, layout: dict[str, Any], share: bool, transfer: str, compose: str
) -> FunnelModel:
    """Path losses on all impressions over conditional (product) or path (direct) heads."""
    transfer = spec.transfer or transfer
    compose = spec.compose or compose
    direct = compose == "direct"
    if direct:
        _chain_only(graph, f"compose: direct ({spec.model})")
    net = FunnelNet(
        graph, spec, layout, share_embeddings=_share(spec, share), direct=direct, transfer=transfer == "ait"
    )
    return FunnelModel(net, EntireSpaceLoss(graph, calibrator=spec.calibrator if direct else 0.0))


@register_model("esmm")
def build_esmm(graph: FunnelGraph, spec: FunnelSpec, layout: dict[str, Any]) -> FunnelModel:
    """ESMM: conditional towers, products along the path, path losses on all impressions."""
    return _entire_space(graph, spec, layout, share=True, transfer="none", compose="product")


build_esmm.supports_branches = True  # ESM²: a `via` stage is a mixture of two towers
build_esmm.takes_transfer = True  # funnel.transfer / compose / calibrator apply


@register_model("esmm_ns")
def build_esmm_ns(graph: FunnelGraph, spec: FunnelSpec, layout: dict[str, Any]) -> FunnelModel:
    """ESMM-NS: ESMM without shared embeddings (each tower has its own tables)."""
    return _entire_space(graph, spec, layout, share=False, transfer="none", compose="product")


build_esmm_ns.supports_branches = True
build_esmm_ns.takes_transfer = True


@register_model("aitm")
def build_aitm(graph: FunnelGraph, spec: FunnelSpec, layout: dict[str, Any]) -> FunnelModel:
    """AITM: shared embeddings, adaptive information transfer between adjacent towers, each
    head predicting its path probability directly, trained with BCE plus the calibrator."""
    return _entire_space(graph, spec, layout, share=True, transfer="ait", compose="direct")


build_aitm.takes_transfer = True


@register_model("division")
def build_division(graph: FunnelGraph, spec: FunnelSpec, layout: dict[str, Any]) -> FunnelModel:
    """DIVISION: separate networks predict every path probability (pCTR, pCTCVR) on all
    impressions; pCVR = pCTCVR / pCTR, clipped at 1."""
    _chain_only(graph, "model division")
    net = FunnelNet(graph, spec, layout, share_embeddings=_share(spec, False), direct=True)
    return FunnelModel(net, EntireSpaceLoss(graph))


@register_model("base")
def build_base(graph: FunnelGraph, spec: FunnelSpec, layout: dict[str, Any]) -> FunnelModel:
    """BASE: each conditional tower on its parent-positive rows only (optionally oversampled)."""
    net = FunnelNet(graph, spec, layout, share_embeddings=_share(spec, False))
    return FunnelModel(net, ConditionalSubsetLoss(graph, oversample=spec.oversample))


@register_model("naive")
def build_naive(graph: FunnelGraph, spec: FunnelSpec, layout: dict[str, Any]) -> FunnelModel:
    """NAIVE: independent towers, each trained on its own observed label over all rows."""
    return FunnelModel(FunnelNet(graph, spec, layout, share_embeddings=_share(spec, False)), ObservedLabelLoss(graph))


def _chain_only(graph: FunnelGraph, what: str) -> None:
    for stage in graph.stages:
        if len(stage.edges) != 1 or stage.edges[0].negated:
            raise ValueError(f"{what} supports chains only; stage {stage.name!r} has branches")
        if stage.group is not None and len(graph.groups[stage.group]) > 1:
            raise ValueError(f"{what} supports chains only; stage {stage.name!r} is in group {stage.group!r}")
