"""A numeric feature as the id of its quantile bin (``embedding: bins``), embedded like a category.

The bin edges are quantiles of the train values, so every bin holds about as many train rows;
tied quantiles (a column that is mostly 0) merge, giving fewer bins. Bin ``k`` (id ``k``, from 1)
holds the values in ``(edges[k-2], edges[k-1]]``: a value on an edge goes to the lower bin, values
below the first edge (``-inf`` included) to id 1 and above the last (``inf`` included) to the last
id. A missing value gets id 0, the unknown id, under ``missing: fill``; ``missing: error`` refuses it.

Streaming fit: the quantiles come from a uniform sample of at most ``RESERVOIR`` train values
(seeded, so a fit is reproducible); a train split no larger than that gives the exact quantiles.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from funnel.data.encoders import finite_numbers, float_values
from funnel.data.streaming import RESERVOIR, Reservoir  # noqa: F401  (RESERVOIR: re-exported)
from funnel.errors import DataError
from funnel.spec.schema import FeatureSpec

log = logging.getLogger(__name__)


@dataclass
class QuantileBinEncoder:
    """(N,) int64 bin ids of a numeric column (the CAT block; see the module docstring)."""

    spec: FeatureSpec
    edges: list[float] | None = None  # None until fitted
    _sample: Reservoir = field(default_factory=Reservoir, repr=False, compare=False)
    _missing: int = field(default=0, repr=False, compare=False)

    @property
    def cardinality(self) -> int:
        """Rows of the feature's table: the bins and the unknown id 0 (unfitted: the most it can have)."""
        bins = self.spec.bins if self.edges is None else len(self.edges) + 1
        return bins + 1

    def _values(self, col: pd.Series, where: str) -> tuple[np.ndarray, np.ndarray]:
        """(float64 values, missing mask); non-numeric cells and, under ``missing: error``, gaps are refused."""
        values = float_values(col, self.spec)
        missing = np.isnan(values)
        if missing.any() and self.spec.missing == "error":
            raise DataError(
                f"{where}: column {self.spec.source!r} has {int(missing.sum())} missing values; set `missing: fill` "
                f"on feature {self.spec.name!r} to give them the unknown bin id 0, or clean the data."
            )
        return values, missing

    def observe(self, col: pd.Series) -> None:
        values, missing = self._values(col, "train")
        self._missing += int(missing.sum())
        self._sample.add(values[np.isfinite(values)])

    def finalize(self) -> QuantileBinEncoder:
        sample, missing = self._sample.values, self._missing
        self._sample, self._missing = Reservoir(), 0
        bins = self.spec.bins
        qs = np.quantile(sample, np.arange(1, bins) / bins) if len(sample) else np.zeros(0)
        self.edges = np.unique(qs).tolist()
        log.info(
            "train: feature %r: %d quantile bins (of %d asked)%s",
            self.spec.name,
            len(self.edges) + 1,
            bins,
            f", {missing} missing values get id 0" if missing else "",
        )
        return self

    def fit(self, col: pd.Series) -> QuantileBinEncoder:
        self.observe(col)
        return self.finalize()

    def encode(self, col: pd.Series, where: str = "data") -> np.ndarray:
        """(N,) int64: 1 + the number of edges below the value; 0 where it is missing."""
        values, missing = self._values(col, where)
        ids = np.searchsorted(np.asarray(self.edges or [], np.float64), values, side="left").astype(np.int64) + 1
        ids[missing] = 0
        return ids

    def state(self) -> dict[str, Any]:
        return {"edges": self.edges}

    def load_state(self, state: dict[str, Any]) -> None:
        if set(state) != {"edges"}:
            raise ValueError(f"binned feature {self.spec.name!r} has state keys {sorted(state)}, expected ['edges']")
        edges = state["edges"]
        array = finite_numbers(edges)
        if array is None or (np.diff(array) <= 0).any():
            raise ValueError(f"binned feature {self.spec.name!r} has edges {edges!r}, not increasing finite numbers")
        self.edges = array.tolist()
