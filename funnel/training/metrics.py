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

from torch import Tensor, nn
from torchmetrics import MeanMetric, SumMetric
from torchmetrics.classification import BinaryAUROC

from funnel.data.table import truth_of as batch_truth
from funnel.graph import FunnelGraph
from funnel.models.losses import bce_from_log_prob


def truth_of(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The generator's true probabilities of a batch (its ``truth_key(kind)`` keys), by kind."""
    return batch_truth(batch)


# View: (pred, target, mask) from the batch's predictions, labels and truth.
View = Callable[[dict[str, Tensor]], tuple[Tensor, Tensor, Tensor | None]]


class Ratio(nn.Module):
    """sum(a) / sum(b), synchronised across processes like any torchmetrics metric."""

    def __init__(self) -> None:
        super().__init__()
        self.num, self.den = SumMetric(), SumMetric()

    def update(self, a: Tensor, b: Tensor) -> None:
        self.num.update(a.sum())
        self.den.update(b.sum())

    def compute(self) -> float:
        den = float(self.den.compute())
        return float(self.num.compute()) / den if den > 0 else math.nan

    def reset(self) -> None:
        self.num.reset()
        self.den.reset()


class FunnelMetrics(nn.Module):
    def __init__(self, graph: FunnelGraph, with_truth: bool = False, free: tuple[str, ...] = ()):
        """``free``: stages with a position-free truth (``auc_free/<s>``)."""
        super().__init__()
        self.with_truth = with_truth
        self.free = tuple(free)
        self.views: dict[str, tuple[str, View]] = {}
        for j, stage in enumerate(graph.stages):
            p = graph.index(stage.after) if stage.after is not None else None
            self._stage_views(stage.name, j, p)
        self.metrics = nn.ModuleDict(
            {key.replace("/", "__"): self._make(kind) for key, (kind, _) in self.views.items()}
        )
        self._seen_pos: dict[str, int] = {}
        self._seen_neg: dict[str, int] = {}

    def _stage_views(self, s: str, j: int, p: int | None) -> None:
        def parent_mask(d: dict[str, Tensor]) -> Tensor | None:
            return None if p is None else d["labels"][:, p] > 0

        v = self.views
        v[f"auc/{s}"] = ("auc", lambda d: (d["reach"][:, j], d["labels"][:, j], None))
        v[f"auc_cond/{s}"] = ("auc", lambda d: (d["cond"][:, j], d["labels"][:, j], parent_mask(d)))
        v[f"logloss/{s}"] = ("logloss", lambda d: (d["log_reach"][:, j], d["labels"][:, j], None))
        v[f"calib/{s}"] = ("ratio", lambda d: (d["reach"][:, j], d["labels"][:, j], None))
        if not self.with_truth:
            return
        if s in self.free:
            v[f"auc_free/{s}"] = ("auc", lambda d: (d["cond"][:, j], d["free"][:, j], None))
        v[f"auc_cond_es/{s}"] = ("auc", lambda d: (d["cond"][:, j], d["cf"][:, j], None))
        v[f"calib_cond_es/{s}"] = ("ratio", lambda d: (d["cond"][:, j], d["true_cond"][:, j], None))
        v[f"mae_cond_es/{s}"] = ("mean", lambda d: ((d["cond"][:, j] - d["true_cond"][:, j]).abs(), None, None))
        v[f"oracle_auc/{s}"] = ("auc", lambda d: (d["true_reach"][:, j], d["labels"][:, j], None))
        v[f"oracle_auc_cond/{s}"] = ("auc", lambda d: (d["true_cond"][:, j], d["labels"][:, j], parent_mask(d)))
        v[f"oracle_auc_cond_es/{s}"] = ("auc", lambda d: (d["true_cond"][:, j], d["cf"][:, j], None))
        v[f"oracle_logloss/{s}"] = (
            "logloss",
            lambda d: (d["true_reach"][:, j].clamp(min=1e-12).log(), d["labels"][:, j], None),
        )

    @staticmethod
    def _make(kind: str) -> nn.Module:
        if kind == "auc":
            return BinaryAUROC(thresholds=None)
        if kind == "ratio":
            return Ratio()
        return MeanMetric()

    def update(self, log_reach: Tensor, log_cond: Tensor, labels: Tensor, truth: dict[str, Tensor]) -> None:
        """All arguments (B, S) in graph order; truth holds "true_cond", "true_reach" and "cf" when known."""
        d = {"log_reach": log_reach, "reach": log_reach.exp(), "cond": log_cond.exp(), "labels": labels}
        if self.with_truth:
            d["true_cond"] = truth["true_cond"]
            d["cf"] = truth["cf"]
            d["true_reach"] = truth["true_reach"]
            if self.free:
                d["free"] = truth["free"]
        for key, (kind, view) in self.views.items():
            pred, target, mask = view(d)
            if mask is not None:
                pred, target = pred[mask], target[mask]
            metric = self.metrics[key.replace("/", "__")]
            if kind == "auc":
                metric.update(pred.float(), target.long())
                self._seen_pos[key] = self._seen_pos.get(key, 0) + int(target.sum())
                self._seen_neg[key] = self._seen_neg.get(key, 0) + int(target.numel() - target.sum())
            elif kind == "logloss":
                metric.update(bce_from_log_prob(pred, target))
            elif kind == "ratio":
                metric.update(pred, target)
            else:
                metric.update(pred)

    def compute(self) -> dict[str, float]:
        out = {}
        for key, (kind, _) in self.views.items():
            metric = self.metrics[key.replace("/", "__")]
            if kind == "auc" and (self._seen_pos.get(key, 0) == 0 or self._seen_neg.get(key, 0) == 0):
                out[key] = math.nan  # AUC is undefined without both classes
                continue
            value = metric.compute()
            out[key] = float(value) if isinstance(value, (Tensor, float, int)) else math.nan
        return out

    def reset(self) -> None:
        for m in self.metrics.values():
            m.reset()
        self._seen_pos.clear()
        self._seen_neg.clear()


def free_stages(graph: FunnelGraph, truth: dict[str, Tensor]) -> tuple[str, ...]:
    """The stages whose position-free truth column is present (not all NaN)."""
    free = truth.get("free")
    if free is None:
        return ()
    return tuple(n for j, n in enumerate(graph.names) if not free[:, j].isnan().all())
