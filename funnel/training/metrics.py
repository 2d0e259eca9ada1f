"""Per-stage metrics, each computed on the space where it is defined.

- ``auc/<s>``, ``logloss/<s>``, ``calib/<s>``: the path probability P(reach s) against
  the stage label over ALL impressions (pCTR, pCTCVR).
- ``auc_cond/<s>``: the conditional probability P(s | after) against the stage label on
  the rows whose parent stage happened only (pCVR on clicked rows).
- With ground truth (synthetic data): ``oracle_*`` are the same metrics for the true
  probabilities; ``auc_cond_es/<s>`` scores the predicted conditional probability on
  ALL impressions against the counterfactual draw ``cf_<s>`` (what pCVR would have
  been had every row been clicked); ``calib_cond_es/<s>`` is the mean predicted over
  the mean true conditional probability on all impressions, and ``mae_cond_es/<s>``
  their mean absolute difference. These expose sample-selection bias directly.
- With a position-free truth (``cf_<s>_free``, synthetic ``positions``): ``auc_free/<s>``
  scores the stage's conditional probability on all rows against the draw had the row
  been shown at the top position; a position-debiased model ranks better here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric, SumMetric
from torchmetrics.classification import BinaryAUROC

from funnel.data.table import truth_of as batch_truth
from funnel.graph import FunnelGraph
from funnel.models.losses import bce_from_log_prob


def truth_of(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The generator's true probabilities of a batch (its ``truth_key(kind)`` keys), by kind."""
    return batch_truth(batch)


# View: (pred, target, mask) from the batch's predictions, labels and truth. Views are
# module-level functions bound with functools.partial, never lambdas or closures: the metrics
# travel with the LightningModule to the workers of `ddp_spawn`, which pickles them.
View = Callable[[dict[str, Tensor]], tuple[Tensor, Tensor | None, Tensor | None]]


def _parent_mask(d: dict[str, Tensor], parent: int | None) -> Tensor | None:
    return None if parent is None else d["labels"][:, parent] > 0


def _column(d: dict[str, Tensor], pred: str, target: str, j: int, parent: int | None = None):
    """Stage ``j`` of ``d[pred]`` against ``d[target]``, on the rows whose parent happened."""
    return d[pred][:, j], d[target][:, j], _parent_mask(d, parent)


def _abs_error(d: dict[str, Tensor], pred: str, truth: str, j: int):
    return (d[pred][:, j] - d[truth][:, j]).abs(), None, None


def _log_of(d: dict[str, Tensor], prob: str, target: str, j: int):
    return d[prob][:, j].clamp(min=1e-12).log(), d[target][:, j], None


class Ratio(nn.Module):
    """sum(a) / sum(b), synchronised across processes like any torchmetrics metric."""

    def __init__(self, **kwargs) -> None:
        super().__init__()
        self.num, self.den = SumMetric(**kwargs), SumMetric(**kwargs)

    def update(self, a: Tensor, b: Tensor) -> None:
        self.num.update(a.sum())
        self.den.update(b.sum())

    def compute(self) -> float:
        den = float(self.den.compute())
        return float(self.num.compute()) / den if den > 0 else math.nan

    def reset(self) -> None:
        self.num.reset()
        self.den.reset()


class ClassCounts(Metric):
    """Positive and negative targets seen by each of ``n`` AUC views, summed over processes.

    An AUC is undefined without both classes; whether it is must be decided on the whole split,
    the same way on every rank (one shard may hold no positive while the split has some), and
    before any rank enters the AUC's own synchronisation."""

    full_state_update = False

    def __init__(self, n: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("pos", torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pos: Tensor, total: Tensor) -> None:
        self.pos += pos
        self.total += total

    def compute(self) -> tuple[Tensor, Tensor]:
        return self.pos, self.total - self.pos


class WeightedMean(Metric):
    """sum(value * weight) / sum(weight) over batches and processes. NaN stays NaN (a diverged
    model's loss must show), where torchmetrics' MeanMetric drops it or, unchecked, the weights."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.zeros(()), dist_reduce_fx="sum")
        self.add_state("weight", torch.zeros(()), dist_reduce_fx="sum")

    def update(self, value: Tensor, weight: float) -> None:
        self.total += value.detach().float().sum() * weight
        self.weight += weight

    def compute(self) -> Tensor:
        return self.total / self.weight


class FunnelMetrics(nn.Module):
    """Every metric of the module docstring for every stage, accumulated batch by batch.

    Under DDP each rank updates with its own shard of the split and :meth:`compute` returns the
    metrics of the whole split on every rank: each state is a torchmetrics state, synchronised
    when computed (the AUCs gather their predictions; sums are all-reduced)."""

    def __init__(
        self, graph: FunnelGraph, with_truth: bool = False, free: tuple[str, ...] = (), sync_on_compute: bool = True
    ):
        """``free``: stages with a position-free truth (``auc_free/<s>``). ``sync_on_compute=False``:
        this process's rows only, also inside a process group (rank 0 scoring a whole split alone)."""
        super().__init__()
        self.with_truth = with_truth
        self.free = tuple(free)
        self._sync = {"sync_on_compute": sync_on_compute}
        self.views: dict[str, tuple[str, View]] = {}
        for j, stage in enumerate(graph.stages):
            p = graph.index(stage.after) if stage.after is not None else None
            self._stage_views(stage.name, j, p)
        self.metrics = nn.ModuleDict(
            {key.replace("/", "__"): self._make(kind) for key, (kind, _) in self.views.items()}
        )
        self._auc_keys = [key for key, (kind, _) in self.views.items() if kind == "auc"]
        self.counts = ClassCounts(len(self._auc_keys), **self._sync)

    def _stage_views(self, s: str, j: int, p: int | None) -> None:
        v = self.views
        v[f"auc/{s}"] = ("auc", partial(_column, pred="reach", target="labels", j=j))
        v[f"auc_cond/{s}"] = ("auc", partial(_column, pred="cond", target="labels", j=j, parent=p))
        v[f"logloss/{s}"] = ("logloss", partial(_column, pred="log_reach", target="labels", j=j))
        v[f"calib/{s}"] = ("ratio", partial(_column, pred="reach", target="labels", j=j))
        if not self.with_truth:
            return
        if s in self.free:
            v[f"auc_free/{s}"] = ("auc", partial(_column, pred="cond", target="free", j=j))
        v[f"auc_cond_es/{s}"] = ("auc", partial(_column, pred="cond", target="cf", j=j))
        v[f"calib_cond_es/{s}"] = ("ratio", partial(_column, pred="cond", target="true_cond", j=j))
        v[f"mae_cond_es/{s}"] = ("mean", partial(_abs_error, pred="cond", truth="true_cond", j=j))
        v[f"oracle_auc/{s}"] = ("auc", partial(_column, pred="true_reach", target="labels", j=j))
        v[f"oracle_auc_cond/{s}"] = ("auc", partial(_column, pred="true_cond", target="labels", j=j, parent=p))
        v[f"oracle_auc_cond_es/{s}"] = ("auc", partial(_column, pred="true_cond", target="cf", j=j))
        v[f"oracle_logloss/{s}"] = ("logloss", partial(_log_of, prob="true_reach", target="labels", j=j))

    def _make(self, kind: str) -> nn.Module:
        if kind == "auc":
            return BinaryAUROC(thresholds=None, **self._sync)
        if kind == "ratio":
            return Ratio(**self._sync)
        return MeanMetric(**self._sync)

    def update(self, log_reach: Tensor, log_cond: Tensor, labels: Tensor, truth: dict[str, Tensor]) -> None:
        """All arguments (B, S) in graph order; truth holds "true_cond", "true_reach" and "cf" when known."""
        d = {"log_reach": log_reach, "reach": log_reach.exp(), "cond": log_cond.exp(), "labels": labels}
        if self.with_truth:
            d["true_cond"] = truth["true_cond"]
            d["cf"] = truth["cf"]
            d["true_reach"] = truth["true_reach"]
            if self.free:
                d["free"] = truth["free"]
        pos, total = [], []  # per AUC view, counted as tensors: no device sync per batch
        for key, (kind, view) in self.views.items():
            pred, target, mask = view(d)
            if mask is not None:
                pred, target = pred[mask], target[mask]
            metric = self.metrics[key.replace("/", "__")]
            if kind == "auc":
                target = target.long()
                metric.update(pred.float(), target)
                pos.append(target.sum())
                total.append(torch.tensor(target.numel(), device=target.device))
            elif kind == "logloss":
                metric.update(bce_from_log_prob(pred, target))
            elif kind == "ratio":
                metric.update(pred, target)
            else:
                metric.update(pred)
        if pos:
            self.counts.update(torch.stack(pos), torch.stack(total))

    def compute(self) -> dict[str, float]:
        """The metrics of everything updated since the last reset (on all ranks together)."""
        pos, neg = self.counts.compute()  # first: every rank then skips the same undefined AUCs
        both_classes = dict(zip(self._auc_keys, ((pos > 0) & (neg > 0)).tolist(), strict=True))
        out = {}
        for key, (kind, _) in self.views.items():
            if kind == "auc" and not both_classes[key]:
                out[key] = math.nan  # AUC is undefined without both classes
                continue
            value = self.metrics[key.replace("/", "__")].compute()
            out[key] = float(value) if isinstance(value, (Tensor, float, int)) else math.nan
        return out

    def reset(self) -> None:
        for m in self.metrics.values():
            m.reset()
        self.counts.reset()


def free_stages(graph: FunnelGraph, truth: dict[str, Tensor]) -> tuple[str, ...]:
    """The stages whose position-free truth column is present (not all NaN)."""
    free = truth.get("free")
    if free is None:
        return ()
    return tuple(n for j, n in enumerate(graph.names) if not free[:, j].isnan().all())
