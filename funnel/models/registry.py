"""Funnel models by name: a network plus the objective it is trained with.

A model builder is a plain function ``(graph, spec, layout) -> FunnelModel`` registered
with ``@register_model("name")``; ``funnel.model: name`` in YAML selects it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import Tensor, nn

from funnel.errors import ConfigError
from funnel.graph import FunnelGraph
from funnel.models.counterfactual import build_regularizer
from funnel.models.net import FunnelNet, FunnelOutput
from funnel.models.weighting import StaticWeighting, build_weighting
from funnel.registry import Registry
from funnel.spec.schema import FunnelSpec


@dataclass
class LossResult:
    total: Tensor  # scalar that is back-propagated
    parts: dict[str, Tensor]  # per-stage terms (detached copies are logged)
    extra: dict[str, Tensor] = field(default_factory=dict)  # non-stage terms in total (calibrator, ...)


class Objective(Protocol):
    def __call__(self, out: FunnelOutput, labels: Tensor) -> LossResult: ...


class FunnelModel(nn.Module):
    """A FunnelNet and the objective that trains it (composition, not subclassing)."""

    def __init__(self, net: FunnelNet, objective: Objective):
        super().__init__()
        self.net = net
        self.objective = objective
        self.weighting: StaticWeighting | None = None  # None: the objective's own static weighted sum
        self.regularizer: nn.Module | None = None  # counterfactual terms (IPS / DR), added to the total

    @property
    def graph(self) -> FunnelGraph:
        return self.net.graph

    def forward(self, batch: dict[str, Tensor]) -> FunnelOutput:
        return self.net(batch)

    def loss(self, out: FunnelOutput, labels: Tensor) -> LossResult:
        result = self.objective(out, labels)
        if self.regularizer is not None:
            terms = self.regularizer(out, labels)
            result.extra.update(terms)
            result.total = result.total + sum(terms.values())
        if self.weighting is not None:  # reweight the stage terms, keep the others as they are
            result.total = self.weighting(result.parts) + sum(result.extra.values())
        return result


Builder = Callable[[FunnelGraph, FunnelSpec, dict[str, Any]], FunnelModel]
MODELS: Registry[Builder] = Registry("model", "funnel.model")
register_model = MODELS.register


def create_model(graph: FunnelGraph, spec: FunnelSpec, layout: dict[str, Any]) -> FunnelModel:
    import funnel.models.zoo  # noqa: F401  (registers the built-in models)

    model = MODELS.get(spec.model)(graph, spec, layout)
    w = spec.loss_weighting
    if w.method != "static":  # every model, built-in or plug-in, gets the same weighting
        model.weighting = build_weighting(
            w.method, graph.names, [s.weight for s in graph.stages], w.temperature, w.alpha
        )
        if w.method == "gradnorm":
            if not model.net.shared:
                raise ConfigError(
                    f"funnel.loss_weighting: gradnorm balances gradients on the shared embeddings, but model "
                    f"{spec.model!r} has private tables; set funnel.share_embeddings: true or pick another method."
                )
            model.weighting.shared = list(model.net.embeddings.parameters())
    c = spec.counterfactual
    if c.method == "dr" and not model.net.shared:
        raise ConfigError(
            f"funnel.counterfactual: dr imputes errors from the shared embeddings, but model {spec.model!r} "
            "has private tables; set funnel.share_embeddings: true or use method ips."
        )
    if c.method != "none":
        model.regularizer = build_regularizer(graph, c.method, c.weight, c.clip, c.stages, model.net.shape.flat_dim)
    return model
