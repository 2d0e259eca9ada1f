"""The built-in funnel models: ESMM and the ablation baselines of the ESMM paper.

| model     | towers give          | trained on                                  | embeddings |
| esmm      | conditional p        | path BCE, all impressions                   | shared     |
| esmm_ns   | conditional p        | path BCE, all impressions                   | per tower  |
| division  | path p directly      | path BCE, all impressions; cond = ratio     | per tower  |
| base      | conditional p        | own BCE on parent-positive rows             | per tower  |
| naive     | conditional p        | own BCE on all rows (unclicked = negative)  | per tower  |
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from funnel.data.layout import FeatureLayout
from funnel.graph import FunnelGraph
from funnel.models.inputs import TowerInput
from funnel.models.losses import bce_from_log_prob, masked_mean
from funnel.models.net import FunnelNet, FunnelOutput
from funnel.models.parts import funnel_net
from funnel.models.registry import Capabilities, LossResult, model_loss, register_model
from funnel.spec.schema import FunnelSpec


class EntireSpaceLoss:
    """Per stage: the mean over ALL impressions of BCE(P(reach s), y_s) (unweighted; the
    run's weighting combines them).

    Only path probabilities are supervised: a conditional tower (pCVR) learns through
    the product, never from a loss on the clicked subset (ESMM, Ma et al. 2018).
    """

    def __init__(self, graph: FunnelGraph, calibrator: float = 0.0):
        self.names = graph.names
        self.calibrator = calibrator  # AITM's α; only meaningful when heads predict paths directly
        self.parents = [(s.name, s.after) for s in graph.stages if s.after is not None]

    def __call__(self, out: FunnelOutput, labels: Tensor) -> LossResult:
        parts = {name: bce_from_log_prob(out.log_reach[name], labels[:, j]).mean() for j, name in enumerate(self.names)}
        extra = {}
        if self.calibrator > 0 and self.parents:
            # α · mean over the batch of Σ_t max(ŷ_t − ŷ_parent(t), 0): a later stage may not be likelier
            gaps = sum((out.log_reach[c].exp() - out.log_reach[p].exp()).clamp(min=0) for c, p in self.parents)
            extra["calibrator"] = self.calibrator * gaps.mean()
        return LossResult(total=None, parts=parts, extra=extra)


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
            (j, s.name, s.edges[0].tower, graph.index(s.after) if s.after else None) for j, s in enumerate(graph.stages)
        ]

    def row_mask(self, labels: Tensor, parent: int | None) -> Tensor:
        return torch.ones_like(labels[:, 0], dtype=torch.bool) if parent is None else labels[:, parent] > 0

    def __call__(self, out: FunnelOutput, labels: Tensor) -> LossResult:
        parts = {}
        for j, name, tower, parent in self.stages:
            y = labels[:, j]
            per_row = F.binary_cross_entropy_with_logits(out.logits[tower], y, reduction="none")
            weight = self.row_mask(labels, parent).to(per_row.dtype)
            if parent is not None and self.oversample != 1.0:
                weight = weight * torch.where(y > 0, self.oversample, 1.0)
            parts[name] = masked_mean(per_row, weight)
        return LossResult(total=None, parts=parts)


class ObservedLabelLoss(ConditionalSubsetLoss):
    """NAIVE: every tower's BCE against its own stage label over ALL impressions.

    The conversion tower thus learns p(conversion | impression) and is then used as if it
    were p(conversion | click): the textbook mistake of treating unclicked impressions as
    negatives of a conditional stage. Kept as a baseline to measure that mistake.
    """

    def row_mask(self, labels: Tensor, parent: int | None) -> Tensor:
        return torch.ones_like(labels[:, 0], dtype=torch.bool)


class Model(nn.Module):
    """A FunnelNet and the objective that trains it (composition, not subclassing): the
    built-in implementation of the :class:`~funnel.models.registry.FunnelModel` contract."""

    def __init__(self, net: FunnelNet, objective: Objective):
        super().__init__()
        self.net = net
        self.objective = objective  # (out, labels) -> unweighted LossResult
        self.weighting: nn.Module | None = None  # set by create_model
        self.regularizer: nn.Module | None = None  # counterfactual terms (IPS / DR), set by create_model

    @property
    def graph(self) -> FunnelGraph:
        return self.net.graph

    @property
    def input_dim(self) -> int | None:
        return self.net.embeddings.shape.flat_dim if self.net.shared else None

    def edge_logits(self, batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], TowerInput | None]:
        return self.net.edge_logits(batch)

    def compose(self, logits: dict[str, Tensor]) -> FunnelOutput:
        return self.net.compose(logits)

    def forward(self, batch: dict[str, Tensor]) -> FunnelOutput:
        return self.net(batch)

    def loss(self, out: FunnelOutput, labels: Tensor) -> LossResult:
        return model_loss(self, out, labels)

    def logged(self) -> dict[str, Tensor]:
        gates = getattr(self.net.bottom, "gates", None) or {}  # MMoE/PLE: mean gate weight per expert
        return {f"gate/{s}/{i}": w[i] for s, w in gates.items() for i in range(len(w))}

    def shared_parameters(self) -> list[nn.Parameter] | None:
        return list(self.net.embeddings.parameters()) if self.net.shared else None


class Objective(Protocol):
    def __call__(self, out: FunnelOutput, labels: Tensor) -> LossResult: ...


def _capabilities(args: dict[str, Any], branches: bool, groups: bool) -> Capabilities:
    """Shared tables allow a bottom, gradnorm and DR; the funnel shapes are the model's own."""
    shared = args["share_embeddings"]
    methods = ("ips", "dr") if shared else ("ips",)
    return Capabilities(branches=branches, groups=groups, bottom=shared, gradnorm=shared, counterfactual=methods)


def _entire_space_capabilities(args: dict[str, Any]) -> Capabilities:
    """Conditional towers multiplied along the path express branches and groups; direct heads
    or information transfer need a chain."""
    chain = args["compose"] == "direct" or args["transfer"] == "ait"
    return _capabilities(args, branches=not chain, groups=not chain)


Transfer = Literal["none", "ait"]
Compose = Literal["product", "direct"]


def _entire_space_builder(share: bool, transfer: Transfer, compose: Compose, doc: str) -> Callable[..., Model]:
    """A builder of path losses on all impressions over conditional (product) or path (direct)
    heads; the three models differ only in their arguments' defaults."""

    def build(
        graph: FunnelGraph,
        spec: FunnelSpec,
        layout: FeatureLayout,
        share_embeddings: bool = share,
        transfer: Transfer = transfer,
        compose: Compose = compose,
        calibrator: float = 0.6,
    ) -> Model:
        if calibrator < 0:
            raise ValueError(f"calibrator must be >= 0, got {calibrator}")
        direct = compose == "direct"
        if direct or transfer == "ait":
            _chain_only(graph, f"model {spec.model.type!r} with compose: {compose}, transfer: {transfer}")
        net = funnel_net(graph, spec, layout, shared=share_embeddings, direct=direct, transfer=transfer == "ait")
        return Model(net, EntireSpaceLoss(graph, calibrator=calibrator if direct else 0.0))

    build.__doc__ = doc
    return build


build_esmm = register_model("esmm", capabilities=_entire_space_capabilities)(
    _entire_space_builder(
        True,
        "none",
        "product",
        """ESMM: conditional towers, products along the path, path losses on all impressions.
        ``share_embeddings``: one set of tables for every tower; ``transfer: ait`` adds AITM's
        information transfer between adjacent towers; ``compose: direct`` makes each head predict
        its path probability, kept monotone by the ``calibrator`` loss (α).""",
    )
)
build_esmm_ns = register_model("esmm_ns", capabilities=_entire_space_capabilities)(
    _entire_space_builder(False, "none", "product", "ESMM-NS: ESMM without shared embeddings (own tables per tower).")
)
build_aitm = register_model("aitm", capabilities=_entire_space_capabilities)(
    _entire_space_builder(
        True,
        "ait",
        "direct",
        """AITM: shared embeddings, adaptive information transfer between adjacent towers, each
        head predicting its path probability directly, trained with BCE plus the calibrator.""",
    )
)


@register_model("division", capabilities=lambda args: _capabilities(args, branches=False, groups=False))
def build_division(
    graph: FunnelGraph, spec: FunnelSpec, layout: FeatureLayout, share_embeddings: bool = False
) -> Model:
    """DIVISION: separate networks predict every path probability (pCTR, pCTCVR) on all
    impressions; pCVR = pCTCVR / pCTR, clipped at 1."""
    _chain_only(graph, "model division")
    return Model(funnel_net(graph, spec, layout, shared=share_embeddings, direct=True), EntireSpaceLoss(graph))


def _subset_capabilities(args: dict[str, Any]) -> Capabilities:
    """Own losses per tower: groups (one softmax) work, branches need the entire-space mixture."""
    return _capabilities(args, branches=False, groups=True)


@register_model("base", capabilities=_subset_capabilities)
def build_base(
    graph: FunnelGraph, spec: FunnelSpec, layout: FeatureLayout, share_embeddings: bool = False, oversample: float = 1.0
) -> Model:
    """BASE: each conditional tower on its parent-positive rows only. ``oversample`` = k counts
    every positive of a conditional tower k times (the paper's OVERSAMPLING baseline)."""
    if oversample < 1:
        raise ValueError(f"oversample must be >= 1 (a duplication factor), got {oversample}")
    net = funnel_net(graph, spec, layout, shared=share_embeddings)
    return Model(net, ConditionalSubsetLoss(graph, oversample=oversample))


@register_model("naive", capabilities=_subset_capabilities)
def build_naive(graph: FunnelGraph, spec: FunnelSpec, layout: FeatureLayout, share_embeddings: bool = False) -> Model:
    """NAIVE: independent towers, each trained on its own observed label over all rows."""
    return Model(funnel_net(graph, spec, layout, shared=share_embeddings), ObservedLabelLoss(graph))


def _chain_only(graph: FunnelGraph, what: str) -> None:
    for stage in graph.stages:
        if len(stage.edges) != 1 or stage.edges[0].negated:
            raise ValueError(f"{what} supports chains only; stage {stage.name!r} has branches")
        if stage.group is not None and len(graph.groups[stage.group]) > 1:
            raise ValueError(f"{what} supports chains only; stage {stage.name!r} is in group {stage.group!r}")
