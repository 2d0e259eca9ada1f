"""A user-written funnel model, registered under a name and used from YAML with its own argument.

A model is any ``nn.Module`` with the members of ``funnel.models.FunnelModel`` (graph,
input_dim, edge_logits, compose, forward, objective, logged, shared_parameters); nothing
needs to be subclassed. A builder ``(graph, spec, layout, **arguments)`` returns it; its
arguments come from YAML and are checked against the builder's signature (names and types)
before any data is read, and the capabilities it declares are checked against the config.

This one is ESMM with a focal loss on the path probabilities (Lin et al. 2017): rows the
model already gets right count less, so rare conversions weigh more. ``gamma: 0`` is ESMM.

    plugins: [custom_model]
    funnel:
      model: {type: esmm_focal, gamma: 2.0}

Run this file to train it on the synthetic funnel (2 epochs):

    python examples/custom_model.py
    python examples/custom_model.py funnel.model.gamma=1.0
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn

from funnel.data.layout import FeatureLayout
from funnel.graph import FunnelGraph
from funnel.models import register_model
from funnel.models.losses import log1mexp
from funnel.models.net import FunnelOutput
from funnel.models.parts import funnel_net
from funnel.models.registry import Capabilities, LossResult
from funnel.spec.schema import FunnelSpec


class FocalESMM(nn.Module):
    """Shared embeddings, one tower per edge, conditionals multiplied along the path (funnel's
    parts), trained with a focal BCE on every path probability over all impressions."""

    def __init__(self, graph: FunnelGraph, spec: FunnelSpec, layout: FeatureLayout, gamma: float):
        super().__init__()
        self.graph = graph
        self.gamma = gamma
        self.net = funnel_net(graph, spec, layout, shared=True)

    @property
    def input_dim(self) -> int:
        return self.net.embeddings.shape.flat_dim

    def edge_logits(self, batch: dict[str, Tensor]):
        return self.net.edge_logits(batch)

    def compose(self, logits: dict[str, Tensor]) -> FunnelOutput:
        return self.net.compose(logits)

    def forward(self, batch: dict[str, Tensor]) -> FunnelOutput:
        return self.net(batch)

    def objective(self, out: FunnelOutput, labels: Tensor) -> LossResult:
        parts = {}
        for j, name in enumerate(self.graph.names):
            log_p, y = out.log_reach[name], labels[:, j]
            log_q = log1mexp(log_p)  # log(1 - p), stable
            # -(1-p)^γ y log p - p^γ (1-y) log(1-p), in log space
            focal = -(torch.exp(self.gamma * log_q) * y * log_p + torch.exp(self.gamma * log_p) * (1 - y) * log_q)
            parts[name] = focal.mean()
        return LossResult(total=None, parts=parts)  # unweighted: the run's weighting combines them

    def logged(self) -> dict[str, Tensor]:
        return {}

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.net.embeddings.parameters())


@register_model(
    "esmm_focal",
    capabilities=Capabilities(branches=True, groups=True, bottom=True, gradnorm=True, counterfactual=("ips", "dr")),
)
def build_esmm_focal(graph: FunnelGraph, spec: FunnelSpec, layout: FeatureLayout, gamma: float = 2.0) -> FocalESMM:
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    return FocalESMM(graph, spec, layout, gamma)


def main(overrides: list[str]) -> int:
    from plugin_demo import fit_with_plugin

    return fit_with_plugin(
        sys.modules[__name__], "custom_model", ["funnel.model={type: esmm_focal, gamma: 2.0}", *overrides]
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
