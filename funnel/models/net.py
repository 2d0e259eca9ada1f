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
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from funnel.graph import FunnelGraph
from funnel.models.inputs import InputShape, TowerInput, module_key
from funnel.models.losses import log1mexp


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
    """The edge network, assembled by a builder from parts (see funnel/models/parts.py):
    input tables (``embeddings`` shared by every tower, or ``private`` tables per tower),
    an optional ``bottom``, one tower and logit head per edge, an optional ``transfer``
    between adjacent towers, an optional position-``bias`` tower, and a compose function
    that turns edge logits into funnel probabilities."""

    def __init__(
        self,
        graph: FunnelGraph,
        towers: nn.ModuleDict,
        heads: nn.ModuleDict,
        compose_fn: Callable[[FunnelGraph, dict[str, Tensor]], FunnelOutput],
        embeddings: nn.Module | None = None,
        private: nn.ModuleDict | None = None,
        bottom: nn.Module | None = None,
        transfer: nn.ModuleDict | None = None,
        bias: nn.Module | None = None,
        bias_stage: str | None = None,
        shape: InputShape | None = None,
    ):
        super().__init__()
        if (embeddings is None) == (private is None):
            raise ValueError("give either shared `embeddings` or `private` tables per tower")
        self.graph = graph
        self.shared = embeddings is not None
        if embeddings is not None:
            self.embeddings = embeddings
        else:
            self.private = private
        self.bottom = bottom
        self.bias = bias
        self.bias_stage = bias_stage
        self.towers = towers
        self.heads = heads
        self.transfer = transfer
        self.compose_fn = compose_fn
        self.shape = shape  # what the towers read (the bottom's width when there is one)
        self.edge_names = {module_key(t): t for t in graph.towers}
        self.stage_towers = {s.name: [module_key(e.tower) for e in s.edges] for s in graph.stages}

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
        logits = {self.edge_names[k]: _head(self.heads[k], h) for k, h in hidden.items()}
        if self.bias is not None and self.bias.active(self.training):
            logits[self.bias_stage] = logits[self.bias_stage] + self.bias(batch)
        return logits, x

    def forward(self, batch: dict[str, Tensor]) -> FunnelOutput:
        logits, inputs = self.edge_logits(batch)
        out = self.compose(logits)
        out.inputs = inputs
        return out

    def compose(self, logits: dict[str, Tensor]) -> FunnelOutput:
        """Funnel probabilities from edge logits, with this network's compose function. In
        float32 also under bf16 autocast (trainer.precision=bf16-mixed): a path's log-probability
        is a sum of log-sigmoids, and bfloat16's 8-bit mantissa would round log p = -8 to steps
        of 0.06 (6% in p), in the loss and in the validation AUCs."""
        return self.compose_fn(self.graph, {k: v.float() for k, v in logits.items()})


def _head(head: nn.Module, h: Tensor) -> Tensor:
    """(B,) logits of one head, outside autocast: under bf16-mixed the heads (one dot product
    per row, nothing to gain) keep float32 logits; heads cast to bfloat16 (``funnel predict
    --bf16``) still run in bfloat16."""
    weight = getattr(head, "weight", None)
    if weight is None or not torch.is_autocast_enabled(h.device.type):
        return head(h).squeeze(-1)
    with torch.autocast(h.device.type, enabled=False):
        return head(h.to(weight.dtype)).squeeze(-1)


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
