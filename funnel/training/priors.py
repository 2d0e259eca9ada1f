"""Start every stage's logit head at its stage's base rate instead of at probability 0.5.

A head initialised with bias 0 predicts 0.5 for every stage; in a funnel the later stages are
rare (Census: 6% earn over 50K, 0.8% earn over 50K and were never married). ESMM's first steps
then mostly push every prediction down on every row: for the conditional tower that push is
the same on all rows, and it drives the tower's ReLU units off together. On Census with MMoE
and ``hidden: [8]`` towers the conditional tower ended with its units off (``auc_cond`` 0.5 or
barely above) on some seeds. Starting at the base rates (the "init the last layer's bias well"
recipe) removes that push, so the first gradients carry the rows' signal instead.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from funnel.models.inputs import module_key
from funnel.models.net import compose_direct

RATE_CLIP = 1e-4  # keeps the logit of a stage that (almost) never or always happens finite


def init_head_priors(model: nn.Module, labels: Tensor | None) -> dict[str, float]:
    """Set the bias of each simple stage's head (one edge from its parent, no group) of a
    built-in FunnelNet to the logit of the stage's train rate: conditional on the parent's rows,
    or along the path for a model whose heads predict the path probability (DIVISION, AITM).
    Returns stage -> the rate used; other models and stages are left as they are."""
    net = getattr(model, "net", None)
    heads = getattr(net, "heads", None)
    if labels is None or heads is None or not len(labels):
        return {}
    graph = net.graph
    direct = getattr(net, "compose_fn", None) is compose_direct
    rates = {}
    for j, stage in enumerate(graph.stages):
        if len(stage.edges) != 1 or stage.group is not None:
            continue
        edge = stage.edges[0]
        key = module_key(edge.tower)
        head = heads[key] if key in heads else None  # noqa: SIM401 (a ModuleDict has no get)
        if edge.negated or edge.source != stage.after or getattr(head, "bias", None) is None:
            continue
        hit = labels[:, j] > 0  # (N,) bool: no float copy of a large memory-mapped table
        rows = labels[:, graph.index(stage.after)] > 0 if stage.after is not None and not direct else None
        n = int(rows.sum()) if rows is not None else len(hit)
        if not n:
            continue
        rate = int((hit & rows).sum() if rows is not None else hit.sum()) / n
        rate = min(max(rate, RATE_CLIP), 1 - RATE_CLIP)
        with torch.no_grad():
            head.bias.fill_(math.log(rate / (1 - rate)))
        rates[stage.name] = rate
    return rates
