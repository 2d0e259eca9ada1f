"""Funnel models by name: the model contract, builders with arguments, declared capabilities.

A model is anything that satisfies :class:`FunnelModel` (an ``nn.Module`` with the methods
below); training, inference and export call nothing else. A builder is a plain function
``(graph, spec, layout, **arguments) -> FunnelModel`` registered with
``@register_model("name", capabilities=...)``. ``funnel.model: name`` or
``funnel.model: {type: name, argument: value}`` in YAML selects it; the arguments are
checked against the builder's signature (names and types) before any data is read, and
the capabilities (branches, groups, a shared bottom, gradnorm, counterfactual terms) are
checked against the config instead of model names.

Every model's objective returns unweighted per-stage terms; :func:`model_loss` combines
them with the one weighting of the run (static stage weights by default) and adds the
non-stage terms (calibrator, counterfactual regularisers).
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from funnel.data.layout import FeatureLayout
from funnel.errors import ConfigError, did_you_mean
from funnel.graph import FunnelGraph
from funnel.models.counterfactual import build_regularizer
from funnel.models.inputs import TowerInput
from funnel.models.net import FunnelOutput
from funnel.models.weighting import build_weighting
from funnel.registry import Registry
from funnel.spec.convert import describe, matches, type_text
from funnel.spec.schema import FunnelSpec


@dataclass
class LossResult:
    total: Tensor | None  # scalar that is back-propagated (set by model_loss)
    parts: dict[str, Tensor]  # per-stage terms, unweighted (detached copies are logged)
    extra: dict[str, Tensor] = field(default_factory=dict)  # non-stage terms in total (calibrator, ...)


@runtime_checkable
class FunnelModel(Protocol):
    """The model contract: an ``nn.Module`` with these members.

    - ``graph``: the funnel it predicts.
    - ``edge_logits(batch)``: one logit per edge tower, and the shared inputs (or None).
    - ``compose(logits)``: path and conditional log-probabilities from the edge logits.
    - ``forward(batch)``: ``compose(edge_logits(batch))`` with the inputs attached.
    - ``objective(out, labels)``: unweighted per-stage terms and non-stage terms.
    - ``logged()``: extra values to log each step (e.g. gate weights), name -> scalar.
    - ``shared_parameters()``: the parameters every stage shares (gradnorm), or None.
    - ``input_dim``: width of ``out.inputs.flat`` (counterfactual imputation), or None.
    """

    graph: FunnelGraph
    input_dim: int | None

    def edge_logits(self, batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], TowerInput | None]: ...

    def compose(self, logits: dict[str, Tensor]) -> FunnelOutput: ...

    def __call__(self, batch: dict[str, Tensor]) -> FunnelOutput: ...

    def objective(self, out: FunnelOutput, labels: Tensor) -> LossResult: ...

    def logged(self) -> dict[str, Tensor]: ...

    def shared_parameters(self) -> list[nn.Parameter] | None: ...


def model_loss(model: nn.Module, out: FunnelOutput, labels: Tensor) -> LossResult:
    """The one weighting path: ``weighting(stage terms) + non-stage terms + regularisers``."""
    result = model.objective(out, labels)
    regularizer = getattr(model, "regularizer", None)
    if regularizer is not None:
        result.extra.update(regularizer(out, labels))
    result.total = model.weighting(result.parts) + sum(result.extra.values())
    return result


@dataclass(frozen=True)
class Capabilities:
    """What a model (with given arguments) can express; validation checks these, not names."""

    branches: bool = False  # stages with `via` (ESM² mixtures of branch towers)
    groups: bool = False  # k-way groups of mutually exclusive sibling stages
    bottom: bool = False  # a shared bottom (shared_bottom, MMoE, PLE) between embeddings and towers
    gradnorm: bool = False  # loss_weighting gradnorm: gradients on tables every stage shares
    counterfactual: tuple[str, ...] = ("ips",)  # ESCM² regulariser methods it supports


CapabilitiesOf = Capabilities | Callable[[dict[str, Any]], Capabilities]
Builder = Callable[..., FunnelModel]


@dataclass(frozen=True)
class ModelEntry:
    build: Builder
    capabilities: CapabilitiesOf = Capabilities()

    def arguments(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """``kwargs`` with the builder's defaults filled in for the arguments not given."""
        defaults = {n: p.default for n, p in _arguments(self.build).items() if p.default is not p.empty}
        return {**defaults, **kwargs}

    def capabilities_for(self, kwargs: dict[str, Any]) -> Capabilities:
        """The capabilities with these arguments (the builder's defaults fill the rest)."""
        caps = self.capabilities
        return caps(self.arguments(kwargs)) if callable(caps) else caps


MODELS: Registry[ModelEntry] = Registry("model", "funnel.model")


def register_model(name: str, capabilities: CapabilitiesOf = Capabilities()) -> Callable[[Builder], Builder]:
    """Register a builder ``(graph, spec, layout, **arguments) -> FunnelModel`` under ``name``.
    ``capabilities``: a :class:`Capabilities`, or a function of the builder's arguments."""

    def decorator(build: Builder) -> Builder:
        MODELS.register(name)(ModelEntry(build, capabilities))
        return build

    return decorator


def _arguments(build: Builder) -> dict[str, inspect.Parameter]:
    params = list(inspect.signature(build).parameters.values())[3:]  # graph, spec, layout
    return {p.name: p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def model_arguments(spec: FunnelSpec) -> dict[str, Any]:
    """The configured model's arguments, the builder's defaults filled in."""
    return MODELS.get(spec.model.type).arguments(spec.model.kwargs)


def argument_problems(spec: FunnelSpec) -> list[str]:
    """Unknown model arguments (with did-you-mean) and values of the wrong type."""
    entry = MODELS.get(spec.model.type)
    params = _arguments(entry.build)
    hints = typing.get_type_hints(entry.build)
    problems = []
    for key, value in spec.model.kwargs.items():
        if key not in params:
            names = list(params)
            problems.append(
                f"funnel.model.{key}: model {spec.model.type!r} has no argument {key!r}.{did_you_mean(key, names)} "
                f"Its arguments: {', '.join(names) or 'none'}."
            )
        elif key in hints and not matches(hints[key], value):
            problems.append(f"funnel.model.{key}: {describe(value)} is not {type_text(hints[key])}.")
    return problems


def create_model(graph: FunnelGraph, spec: FunnelSpec, layout: FeatureLayout) -> FunnelModel:
    """Build the configured model and give it the run's weighting and regularisers."""
    import funnel.models.zoo  # noqa: F401  (registers the built-in models)

    entry = MODELS.get(spec.model.type)
    try:
        model = entry.build(graph, spec, layout, **spec.model.kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"funnel.model: model {spec.model.type!r} rejected its arguments: {exc}") from None
    names = graph.names
    weights = {s.name: s.weight for s in spec.stages}
    w = spec.loss_weighting
    model.weighting = build_weighting(w.method, names, [weights[n] for n in names], w.temperature, w.alpha)
    if w.method == "gradnorm":
        shared = model.shared_parameters()
        if not shared:
            raise ConfigError(
                f"funnel.loss_weighting: gradnorm balances gradients on the shared embeddings, but model "
                f"{spec.model.type!r} has none; share the embeddings or pick another method."
            )
        model.weighting.shared = shared
    c = spec.counterfactual
    model.regularizer = None
    if c.method != "none":
        if c.method == "dr" and model.input_dim is None:
            raise ConfigError(
                f"funnel.counterfactual: dr imputes errors from the shared embeddings, but model "
                f"{spec.model.type!r} has none; share the embeddings or use method ips."
            )
        model.regularizer = build_regularizer(graph, c.method, c.weight, c.clip, c.stages, model.input_dim or 0)
    return model
