"""FunnelNet: shared embeddings → one tower + logit head per edge → funnel probabilities.

All probabilities are carried as logs. For a stage with a single edge (a chain):

    log p_cond(s)  = logsigmoid(logit_s)
    log P(s)       = log P(after(s)) + log p_cond(s)

With several edges (ESM² branches), P(s) = Σ_e P(source_e) · σ(logit_e), a logsumexp,
where a negated source "parent happened, stage t did not" has probability
P(after(t)) · (1 - p_cond(t)). Members of a group (mutually exclusive siblings) share one
softmax with a fixed 0 logit for "none of them": log p_cond(m) = logit_m - log(1 + Σ exp logit).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from funnel.errors import ConfigError
from funnel.graph import FunnelGraph
from funnel.models.bias import BiasTower
from funnel.models.bottoms import build_bottom
from funnel.models.embedding import SharedEmbeddings
from funnel.models.inputs import TowerInput, module_key
from funnel.models.losses import log1mexp
from funnel.models.towers import build_tower
from funnel.models.transfer import AdaptiveTransfer
from funnel.spec.schema import FunnelSpec, TowerSpec


@dataclass
class FunnelOutput:
    logits: dict[str, Tensor]  # tower (edge) name -> (B,)
    log_reach: dict[str, Tensor]  # stage -> (B,) log P(stage | impression)
    log_cond: dict[str, Tensor]  # stage -> (B,) log P(stage | after-stage)
    inputs: TowerInput | None = None  # the shared embeddings' output (None with private tables)

    def log_stacked(self, names: list[str]) -> tuple[Tensor, Tensor]:
        """(B, S) path and conditional log-probabilities in the order of ``names``."""
        return (
            torch.stack([self.log_reach[n] for n in names], 1),
            torch.stack([self.log_cond[n] for n in names], 1),
        )

    def stacked(self, names: list[str]) -> tuple[Tensor, Tensor]:
        """(B, S) path and conditional probabilities in the order of ``names``."""
        log_reach, log_cond = self.log_stacked(names)
        return log_reach.exp(), log_cond.exp()


class FunnelNet(nn.Module):
    def __init__(
        self,
        graph: FunnelGraph,
        spec: FunnelSpec,
        layout: dict[str, Any],
        share_embeddings: bool = True,
        direct: bool = False,
        transfer: bool = False,
    ):
        """``direct``: each tower predicts its stage's path probability itself (DIVISION)
        instead of a conditional probability that is multiplied along the path."""
        super().__init__()
        self.graph = graph
        self.shared = share_embeddings
        self.direct = direct
        bias = spec.bias_tower
        exclude = frozenset(bias.features) if bias is not None else frozenset()
        if share_embeddings:
            self.embeddings = SharedEmbeddings(layout, exclude=exclude)
        else:  # each tower owns a full set of tables (ESMM-NS, the paper's BASE)
            self.private = nn.ModuleDict(
                {module_key(t): SharedEmbeddings(layout, exclude=exclude) for t in graph.towers}
            )
        shape = self.embeddings.shape if share_embeddings else next(iter(self.private.values())).shape
        self.bottom = None
        if spec.bottom is not None and spec.bottom.type != "none":
            if not share_embeddings:
                raise ConfigError(
                    f"funnel.bottom: a shared bottom needs shared embeddings, but model {spec.model!r} gives every "
                    "tower its own tables; use esmm or aitm, or set funnel.share_embeddings: true."
                )
            self.bottom = build_bottom(spec.bottom, shape, graph.names)
            shape = dataclasses.replace(shape, flat_dim=self.bottom.out_dim)
        self.shape = shape
        self.bias = None
        self.bias_stage = None
        if bias is not None:
            self.bias_stage = bias.stage or graph.names[0]
            self.bias = BiasTower(layout, bias.features, bias.hidden, bias.keep_at_inference, bias.feature_dropout)
        tower_spec = {s.name: s.tower or spec.tower for s in spec.stages}
        self.towers = nn.ModuleDict()
        self.heads = nn.ModuleDict()
        for stage in graph.stages:
            for edge in stage.edges:
                t: TowerSpec = tower_spec.get(stage.name, spec.tower)  # every branch tower of a stage alike
                tower = build_tower(t, shape, f"funnel.stages.{stage.name}.tower")
                self.towers[module_key(edge.tower)] = tower
                self.heads[module_key(edge.tower)] = nn.Linear(tower.out_dim, 1)
        self.edge_names = {module_key(t): t for t in graph.towers}
        self.stage_towers = {s.name: [module_key(e.tower) for e in s.edges] for s in graph.stages}
        self.transfer = None
        if transfer:  # AITM: each stage after the first receives from its parent
            widths = {t.out_dim for t in self.towers.values()}
            if len(widths) != 1 or any(len(s.edges) != 1 for s in graph.stages):
                raise ConfigError(
                    "funnel.transfer: ait needs a chain whose towers all have the same output width "
                    f"(got widths {sorted(widths)}); give every stage the same tower."
                )
            width = widths.pop()
            self.transfer = nn.ModuleDict(
                {module_key(s.name): AdaptiveTransfer(width) for s in graph.stages if s.after}
            )

    def edge_logits(self, batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], TowerInput | None]:
        x = None
        if self.shared and self.bottom is not None:
            x = self.embeddings(batch)
            per_stage = self.bottom(x)  # stage -> (B, bottom.out_dim), each stage's towers read their own
            hidden = {
                key: self.towers[key](dataclasses.replace(x, flat=per_stage[stage]))
                for stage, keys in self.stage_towers.items()
                for key in keys
            }
        elif self.shared:
            x = self.embeddings(batch)
            hidden = {k: tower(x) for k, tower in self.towers.items()}  # each (B, out_dim)
        else:
            hidden = {k: tower(self.private[k](batch)) for k, tower in self.towers.items()}
        if self.transfer is not None:
            for stage in self.graph.stages:  # parents first: z_parent is final when its child reads it
                if stage.after is not None:
                    key = module_key(stage.name)
                    hidden[key] = self.transfer[key](hidden[module_key(stage.after)], hidden[key])
        logits = {self.edge_names[k]: self.heads[k](h).squeeze(-1) for k, h in hidden.items()}
        if self.bias is not None and self.bias.active(self.training):
            logits[self.bias_stage] = logits[self.bias_stage] + self.bias(batch)
        return logits, x

    def forward(self, batch: dict[str, Tensor]) -> FunnelOutput:
        logits, inputs = self.edge_logits(batch)
        out = self.compose(logits)
        out.inputs = inputs
        return out

    def compose(self, logits: dict[str, Tensor]) -> FunnelOutput:
        """Funnel probabilities from edge logits, the way this network is configured."""
        return compose_direct(self.graph, logits) if self.direct else compose(self.graph, logits)


def compose(graph: FunnelGraph, logits: dict[str, Tensor]) -> FunnelOutput:
    """Path and conditional log-probabilities of every stage from the edge logits."""
    log_reach: dict[str, Tensor] = {}
    log_cond: dict[str, Tensor] = {}
    any_logit = next(iter(logits.values()))
    zero = torch.zeros_like(any_logit)

    def reach(name: str | None) -> Tensor:
        return zero if name is None else log_reach[name]

    # log of the softmax normaliser per group: logsumexp over [0 ("none"), member logits]
    log_norm = {
        g: torch.logsumexp(torch.stack([zero] + [logits[graph.stage(m).edges[0].tower] for m in members]), 0)
        for g, members in graph.groups.items()
    }
    for stage in graph.stages:
        if len(stage.edges) == 1 and not stage.edges[0].negated and stage.edges[0].source == stage.after:
            logit = logits[stage.edges[0].tower]
            log_cond[stage.name] = F.logsigmoid(logit) if stage.group is None else logit - log_norm[stage.group]
            log_reach[stage.name] = reach(stage.after) + log_cond[stage.name]
            continue
        terms = []
        for edge in stage.edges:
            if edge.negated and edge.source in log_norm:  # none of the group: P(after) · softmax_none
                log_src = reach(graph.after_of(edge.source)) - log_norm[edge.source]
            elif edge.negated:  # P(after(src)) · (1 - p_cond(src))
                src = graph.stage(edge.source)
                log_src = reach(src.after) + log1mexp(log_cond[src.name])
            else:
                log_src = reach(edge.source)
            terms.append(log_src + F.logsigmoid(logits[edge.tower]))
        log_reach[stage.name] = torch.logsumexp(torch.stack(terms, 0), 0)
        log_cond[stage.name] = log_reach[stage.name] - reach(stage.after)
    return FunnelOutput(logits=logits, log_reach=log_reach, log_cond=log_cond)


def compose_direct(graph: FunnelGraph, logits: dict[str, Tensor]) -> FunnelOutput:
    """Each stage's single tower gives log P(stage) directly; the conditional probability
    is the ratio P(stage) / P(after), clipped at 1 (the ESMM paper's DIVISION model)."""
    log_reach: dict[str, Tensor] = {}
    log_cond: dict[str, Tensor] = {}
    for stage in graph.stages:
        log_reach[stage.name] = F.logsigmoid(logits[stage.edges[0].tower])
        parent = log_reach[stage.after] if stage.after is not None else torch.zeros_like(log_reach[stage.name])
        log_cond[stage.name] = (log_reach[stage.name] - parent).clamp(max=0.0)  # ratio clipped to <= 1
    return FunnelOutput(logits=logits, log_reach=log_reach, log_cond=log_cond)
