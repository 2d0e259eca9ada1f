"""Counterfactual regularisers on conditional edges (ESCM², Wang et al., SIGIR 2022).

For a stage s with parent p (o = 1 where p happened, the only rows where s's conditional
label is observed), ĉ = the conditional probability of s, P̂ = the DETACHED path
probability of p clipped to [clip, 1] (the propensity; no gradient reaches its towers),
and e = BCE(y_s, ĉ):

- ``ips``: λ · mean over ALL impressions of o · e / P̂
- ``dr``:  λ · mean over all impressions of [ê + o · (e − ê) / P̂]   (ê detached)
           + λ · mean of o · (e − ê)² / P̂                           (trains ê only; e detached)
  where ê ≥ 0 comes from an imputation tower per stage over the shared embeddings.
"""

from __future__ import annotations

from torch import Tensor, nn

from funnel.graph import FunnelGraph
from funnel.models.inputs import module_key
from funnel.models.losses import bce_from_log_prob
from funnel.models.net import FunnelOutput


class CounterfactualRegularizer(nn.Module):
    def __init__(
        self,
        graph: FunnelGraph,
        method: str,
        weight: float,
        clip: float,
        stages: list[str],
        input_dim: int,
        hidden: int = 32,
    ):
        super().__init__()
        self.method, self.weight, self.clip = method, weight, clip
        # (stage column, parent column, stage, parent) for every regularised edge
        self.edges = [(graph.index(s), graph.index(graph.stage(s).after), s, graph.stage(s).after) for s in stages]
        self.imputation = nn.ModuleDict()
        if method == "dr":
            for s in stages:
                self.imputation[module_key(s)] = nn.Sequential(
                    nn.Linear(input_dim, hidden), nn.ReLU(), nn.Linear(hidden, 1), nn.Softplus()
                )

    def forward(self, out: FunnelOutput, labels: Tensor) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = {}
        for j, p, s, parent in self.edges:
            observed = labels[:, p]  # o: the parent happened
            propensity = out.log_reach[parent].detach().exp().clamp(min=self.clip, max=1.0)
            error = bce_from_log_prob(out.log_cond[s], labels[:, j])  # e, from ĉ = P(s | parent)
            if self.method == "ips":
                terms[f"ips/{s}"] = self.weight * (observed * error / propensity).mean()
                continue
            imputed = self.imputation[module_key(s)](out.inputs.flat).squeeze(-1)  # ê, (B,)
            dr = imputed.detach() + observed * (error - imputed.detach()) / propensity
            imp = observed * (error.detach() - imputed) ** 2 / propensity
            terms[f"dr/{s}"] = self.weight * dr.mean()
            terms[f"dr_imputation/{s}"] = self.weight * imp.mean()
        return terms


def build_regularizer(
    graph: FunnelGraph, method: str, weight: float, clip: float, stages: tuple[str, ...], input_dim: int
) -> CounterfactualRegularizer:
    chosen = list(stages) or [s.name for s in graph.stages if s.after is not None]
    return CounterfactualRegularizer(graph, method, weight, clip, chosen, input_dim)
