"""Reliability bins: rows grouped by predicted score, each bin's mean prediction against its
observed rate (and the mean true probability, when the data has it)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

N_BINS = 10


@dataclass(frozen=True)
class Bins:
    """One reliability diagram's numbers, one entry per non-empty bin, in score order."""

    lo: np.ndarray  # the bin's lowest and highest score
    hi: np.ndarray
    count: np.ndarray  # rows in the bin
    predicted: np.ndarray  # mean predicted probability
    observed: np.ndarray  # the rate of positive labels
    truth: np.ndarray | None  # mean true probability (synthetic data), else None

    @property
    def rows(self) -> int:
        return int(self.count.sum())


def reliability(
    pred: np.ndarray, label: np.ndarray, truth: np.ndarray | None = None, n_bins: int = N_BINS, equal: str = "count"
) -> Bins:
    """Bins of ``pred``: ``equal="count"`` (quantiles: every bin holds about as many rows, which
    suits the skewed scores of later stages) or ``"width"`` (equal slices of [0, 1])."""
    pred = np.asarray(pred, dtype=np.float64)
    label = np.asarray(label, dtype=np.float64)
    if equal == "count":
        order = np.argsort(pred, kind="stable")
        # the rank decides the bin: ties split across bins rather than collapsing them
        which = np.empty(len(pred), dtype=np.int64)
        which[order] = np.arange(len(pred)) * n_bins // max(len(pred), 1)
    elif equal == "width":
        which = np.clip((pred * n_bins).astype(np.int64), 0, n_bins - 1)
    else:
        raise ValueError(f"equal must be 'count' or 'width', got {equal!r}")
    count = np.bincount(which, minlength=n_bins)
    keep = count > 0

    def mean(values: np.ndarray) -> np.ndarray:
        return (np.bincount(which, weights=values, minlength=n_bins)[keep] / count[keep]).astype(np.float64)

    lo = np.full(n_bins, np.inf)
    hi = np.full(n_bins, -np.inf)
    np.minimum.at(lo, which, pred)
    np.maximum.at(hi, which, pred)
    return Bins(
        lo=lo[keep],
        hi=hi[keep],
        count=count[keep],
        predicted=mean(pred),
        observed=mean(label),
        truth=None if truth is None else mean(np.asarray(truth, dtype=np.float64)),
    )
