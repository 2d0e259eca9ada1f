"""Statistics of a column seen chunk by chunk, equal to those of the whole column at once.

The streaming prepare pass fits the encoders over chunks of files larger than memory: each
encoder ``observe``s a chunk, then ``finalize``s. Two accumulators make that exact and keep
memory in the number of distinct values, not of rows:

- ``ValueCounts``: the count of every value (int64 ids, or string tokens). Each chunk adds one
  (values, counts) pair; the pending pairs are merged with one ``np.unique`` / ``groupby`` when
  they outgrow the merged table, so merging costs amortised O(distinct values) per chunk.
- ``Moments``: count, mean, sums of squared and cubed deviations and the minimum (float64),
  merged with Chan et al.'s / Pébay's parallel formulas; one chunk gives ``np.mean`` /
  ``np.std`` bit for bit, and the skewness of any chunking agrees with the whole column's
  to rounding.

``Reservoir`` is the one approximate accumulator: a seeded uniform sample of at most
``RESERVOIR`` values, for the quantiles of quantile bins and ``transform: quantile``; exact
for a train split no larger than that.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

# pending (value, count) pairs merged once they pass this many (or twice the merged table)
MERGE_AT = 4_000_000


@dataclass
class ValueCounts:
    """Counts of int64 values and of string tokens; ``tokens()`` gives them as one string table."""

    ints: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # (unique values, counts)
    strings: list[pd.Series] = field(default_factory=list)  # token -> count
    pending: int = 0  # pairs added since the last merge
    merged: int = 0  # pairs in the merged tables

    @property
    def only_ints(self) -> bool:
        """Every value seen was an int64 (at least one was seen)."""
        return bool(self.ints) and not self.strings

    def add_ints(self, values: np.ndarray) -> None:
        uniq, counts = np.unique(values, return_counts=True)
        self.ints.append((uniq, counts.astype(np.int64)))
        self._grew(len(uniq))

    def add_tokens(self, tokens: pd.Series) -> None:
        counts = tokens.value_counts(sort=False)
        self.strings.append(counts.astype(np.int64))
        self._grew(len(counts))

    def _grew(self, n: int) -> None:
        self.pending += n
        if self.pending > max(MERGE_AT, 2 * self.merged):
            self._merge()

    def _merge(self) -> None:
        if len(self.ints) > 1:
            self.ints = [_sum_ints(self.ints)]
        if len(self.strings) > 1:
            self.strings = [_sum_strings(self.strings)]
        self.merged = sum(len(v) for v, _ in self.ints) + sum(len(s) for s in self.strings)
        self.pending = 0

    def int_table(self) -> tuple[np.ndarray, np.ndarray]:
        """(sorted unique int64 values, counts), with no string tokens seen."""
        self._merge()
        return self.ints[0] if self.ints else (np.zeros(0, np.int64), np.zeros(0, np.int64))

    def token_table(self) -> tuple[np.ndarray, np.ndarray]:
        """(tokens as a numpy str array, counts) of everything seen; an int is the token of its
        decimal text (what ``as_tokens`` makes of it)."""
        self._merge()
        parts = list(self.strings)
        if self.ints:
            values, counts = self.ints[0]
            parts.append(pd.Series(counts, index=pd.Index(values.astype(str), dtype=object)))
        if not parts:
            return np.zeros(0, dtype=str), np.zeros(0, np.int64)
        table = _sum_strings(parts) if len(parts) > 1 else parts[0]
        return np.asarray(table.index, dtype=str), table.to_numpy(np.int64)


def _sum_ints(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    values = np.concatenate([v for v, _ in parts])
    counts = np.concatenate([c for _, c in parts])
    if not len(values):
        return values, counts
    order = np.argsort(values, kind="stable")
    values, counts = values[order], counts[order]
    starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])
    return values[starts], np.add.reduceat(counts, starts)  # integer sums: exact at any count


def _sum_strings(parts: list[pd.Series]) -> pd.Series:
    return pd.concat(parts).groupby(level=0, sort=False).sum().astype(np.int64)


@dataclass
class Moments:
    """Count, mean, sums of squared and cubed deviations and minimum of float64 values, chunk by chunk."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0
    m3: float = 0.0
    low: float = float("inf")

    def add(self, values: np.ndarray) -> None:
        if not len(values):
            return
        nb = len(values)
        mb = values.mean()
        dev = values - mb
        m2b = float(np.sum(dev * dev))  # np.std's own arithmetic: one chunk gives its result exactly
        m3b = float(np.sum(dev * dev * dev))
        self.low = min(self.low, float(values.min()))
        if self.n == 0:
            self.n, self.mean, self.m2, self.m3 = nb, float(mb), m2b, m3b
            return
        na, n = self.n, self.n + nb
        delta = float(mb) - self.mean
        # Pébay (2008): the third central moment of the union, from the old m2 before it is updated
        self.m3 += m3b + delta**3 * na * nb * (na - nb) / (n * n) + 3 * delta * (na * m2b - nb * self.m2) / n
        self.mean += delta * nb / n
        self.m2 += m2b + delta * delta * (na * nb / n)
        self.n = n

    @property
    def std(self) -> float:
        """The population standard deviation (``np.std``'s default)."""
        return float(np.sqrt(self.m2 / self.n)) if self.n else 0.0

    @property
    def skewness(self) -> float:
        """The sample skewness g1 = m3 / m2^1.5 (``scipy.stats.skew``'s default); 0 for a constant."""
        if not self.n or self.m2 <= 0:
            return 0.0
        return float(self.m3 / self.n / (self.m2 / self.n) ** 1.5)


RESERVOIR = 1_000_000  # train values kept to fit the quantiles (8 MB of float64 per feature)


@dataclass
class Reservoir:
    """A uniform random sample of at most ``size`` values of a stream (Algorithm R, one
    vectorised step per chunk): value ``i`` replaces a kept one with probability size / (i + 1)."""

    size: int = RESERVOIR
    seed: int = 0
    seen: int = 0
    values: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    rng: np.random.Generator | None = None

    def add(self, values: np.ndarray) -> None:
        room = self.size - len(self.values)
        if room > 0:
            self.values = np.concatenate([self.values, values[:room]])
            self.seen += min(room, len(values))
            values = values[room:]
        if not len(values):
            return
        if self.rng is None:
            self.rng = np.random.default_rng(self.seed)
        index = self.seen + np.arange(len(values))  # each value's position in the stream
        slot = (self.rng.random(len(values)) * (index + 1)).astype(np.int64)
        kept = slot < self.size
        self.values[slot[kept]] = values[kept]  # repeated slots: the later value wins, as in order
        self.seen += len(values)
