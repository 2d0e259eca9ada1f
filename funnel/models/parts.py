"""The parts a model builder assembles into a :class:`~funnel.models.net.FunnelNet`.

Each is a plain function of the graph, the funnel spec and the feature layout. They are
called in a fixed order (inputs, bottom, bias tower, towers and heads, transfer) so that the
random initialisation, and so every trained result, does not depend on which builder runs.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from funnel.data.layout import FeatureLayout
from funnel.errors import ConfigError
from funnel.graph import FunnelGraph
from funnel.models.bias import BiasTower
from funnel.models.bottoms import build_bottom
from funnel.models.embedding import SharedEmbeddings
from funnel.models.inputs import InputShape, module_key
from funnel.models.net import FunnelNet, compose, compose_direct
from funnel.models.towers import build_tower
from funnel.models.transfer import AdaptiveTransfer
from funnel.spec.schema import FunnelSpec, TowerSpec


def input_tables(
    graph: FunnelGraph, spec: FunnelSpec, layout: FeatureLayout, shared: bool
) -> tuple[SharedEmbeddings | None, nn.ModuleDict | None, InputShape]:
    """Shared tables read by every tower, or a full private set per tower (ESMM-NS, BASE).
    The bias tower's features are left out: that tower reads them alone."""
    bias = spec.bias_tower
    exclude = frozenset(bias.features) if bias is not None else frozenset()
    if shared:
        embeddings = SharedEmbeddings(layout, exclude=exclude)
        return embeddings, None, embeddings.shape
    private = nn.ModuleDict({module_key(t): SharedEmbeddings(layout, exclude=exclude) for t in graph.towers})
    return None, private, next(iter(private.values())).shape


def bottom(
    graph: FunnelGraph, spec: FunnelSpec, shape: InputShape, shared: bool
) -> tuple[nn.Module | None, InputShape]:
    """The configured shared bottom (None without one), and the input shape its towers then see."""
    if spec.bottom is None or spec.bottom.type == "none":
        return None, shape
    if not shared:
        raise ConfigError(
            f"funnel.bottom: a shared bottom needs shared embeddings, but model {spec.model.type!r} gives every "
            "tower its own tables; use esmm or aitm, or set funnel.model.share_embeddings: true."
        )
    module = build_bottom(spec.bottom, shape, graph.names)
    return module, dataclasses.replace(shape, flat_dim=module.out_dim)


def bias_tower(graph: FunnelGraph, spec: FunnelSpec, layout: FeatureLayout) -> tuple[BiasTower | None, str | None]:
    """The position-bias tower and the stage whose logit it shifts in training (None without one)."""
    b = spec.bias_tower
    if b is None:
        return None, None
    return BiasTower(layout, b.features, b.hidden, b.keep_at_inference, b.feature_dropout), b.stage or graph.names[0]


def edge_towers(graph: FunnelGraph, spec: FunnelSpec, shape: InputShape) -> tuple[nn.ModuleDict, nn.ModuleDict]:
    """One tower and one logit head per edge; every branch tower of a stage alike."""
    tower_spec = {s.name: s.tower or spec.tower for s in spec.stages}
    towers, heads = nn.ModuleDict(), nn.ModuleDict()
    for stage in graph.stages:
        for edge in stage.edges:
            t: TowerSpec = tower_spec.get(stage.name, spec.tower)
            tower = build_tower(t, shape, f"funnel.stages.{stage.name}.tower")
            towers[module_key(edge.tower)] = tower
            heads[module_key(edge.tower)] = nn.Linear(tower.out_dim, 1)
    return towers, heads


def ait_transfer(graph: FunnelGraph, towers: nn.ModuleDict) -> nn.ModuleDict:
    """AITM's adaptive information transfer: each stage after the first receives from its parent."""
    widths = {t.out_dim for t in towers.values()}
    if len(widths) != 1 or any(len(s.edges) != 1 for s in graph.stages):
        raise ConfigError(
            "funnel.model.transfer: ait needs a chain whose towers all have the same output width "
            f"(got widths {sorted(widths)}); give every stage the same tower."
        )
    width = widths.pop()
    return nn.ModuleDict({module_key(s.name): AdaptiveTransfer(width) for s in graph.stages if s.after})


def funnel_net(
    graph: FunnelGraph,
    spec: FunnelSpec,
    layout: FeatureLayout,
    shared: bool,
    direct: bool = False,
    transfer: bool = False,
) -> FunnelNet:
    """The usual assembly: inputs → [bottom] → towers and heads → [transfer] → compose.
    ``direct``: each head predicts its stage's path probability (DIVISION, AITM) instead of a
    conditional probability multiplied along the path."""
    embeddings, private, shape = input_tables(graph, spec, layout, shared)
    shared_bottom, shape = bottom(graph, spec, shape, shared)
    bias, bias_stage = bias_tower(graph, spec, layout)
    towers, heads = edge_towers(graph, spec, shape)
    return FunnelNet(
        graph,
        towers,
        heads,
        compose_direct if direct else compose,
        embeddings=embeddings,
        private=private,
        bottom=shared_bottom,
        transfer=ait_transfer(graph, towers) if transfer else None,
        bias=bias,
        bias_stage=bias_stage,
        shape=shape,
    )
