"""Feature encoders fitted on the training split only and saved as JSON with each run.

Every encoder works on whole columns (pandas / numpy vectorised); id 0 is reserved for
unknown, rare and padding values, so an unseen category at predict time is harmless.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from funnel.errors import DataError
from funnel.spec.schema import FeatureSpec

log = logging.getLogger(__name__)

MISSING_TOKEN = "<NA>"


def as_tokens(col: pd.Series) -> pd.Series:
    """Column → strings, so 12, 12.0 and "12" are the same category in every file."""
    if pd.api.types.is_float_dtype(col):
        vals = col.dropna()
        if len(vals) and np.all(np.mod(vals.to_numpy(), 1) == 0):
            col = col.astype("Int64")
    out = col.astype("string").fillna(MISSING_TOKEN)
    return out.astype(object)


def int_values(col: pd.Series) -> np.ndarray | None:
    """The column as int64 when it is integer-coded without missing values (12 and 12.0
    alike), else None. Such columns skip the string conversion of `as_tokens`: same ids, faster."""
    if pd.api.types.is_bool_dtype(col) or col.isna().any():
        return None
    if pd.api.types.is_integer_dtype(col):
        return col.to_numpy(np.int64)
    if pd.api.types.is_float_dtype(col):
        vals = col.to_numpy(np.float64)
        if np.all(np.mod(vals, 1) == 0) and np.all(np.abs(vals) < 2**53):
            return vals.astype(np.int64)
    return None


@dataclass
class CategoricalEncoder:
    spec: FeatureSpec
    vocab: list[str] = field(default_factory=list)
    int_vocab: bool = False  # every token is the plain text of an int64 (fitted on an integer column)
    _lookup: dict[str, pd.Index] = field(default_factory=dict, repr=False, compare=False)  # built lazily

    @property
    def cardinality(self) -> int:
        """Number of ids including the unknown id 0."""
        return (self.spec.hash_buckets or len(self.vocab)) + 1

    def fit(self, col: pd.Series) -> CategoricalEncoder:
        if self.spec.hash_buckets is None:
            ints = int_values(col)
            self.int_vocab = ints is not None
            if ints is not None:
                values, counts = np.unique(ints, return_counts=True)
                tokens = values.astype(str)
            else:
                vc = as_tokens(col).value_counts(sort=False)
                tokens, counts = np.asarray(vc.index, dtype=str), vc.to_numpy()
            keep = counts >= self.spec.min_count
            tokens, counts = tokens[keep], counts[keep]
            # frequency order, ties by value (as strings): deterministic and frequent ids are small
            self.vocab = tokens[np.lexsort((tokens, -counts))].tolist()
            self._lookup.clear()
        return self

    def _index(self, kind: str) -> pd.Index | None:
        """The vocabulary as a pandas Index of strings ("str") or of ints ("int", None when a
        token is not the plain text of an int, e.g. "012" or "a")."""
        if kind not in self._lookup:
            if kind == "str":
                self._lookup[kind] = pd.Index(self.vocab, dtype=object)
            else:
                try:
                    ints = list(map(int, self.vocab))
                    # canonical only: int() also takes " 12", "012" and "1_000", which stay distinct
                    # tokens (a vocabulary fitted on an integer column is canonical: no check needed)
                    canonical = self.int_vocab or list(map(str, ints)) == self.vocab
                    index = pd.Index(np.array(ints, dtype=np.int64)) if canonical else None
                except (ValueError, OverflowError):
                    index = None
                self._lookup[kind] = index
        return self._lookup[kind]

    def encode_tokens(self, tokens: pd.Series) -> np.ndarray:
        if self.spec.hash_buckets is not None:
            hashed = pd.util.hash_pandas_object(tokens, index=False).to_numpy()
            return (hashed % np.uint64(self.spec.hash_buckets)).astype(np.int64) + 1
        return self._index("str").get_indexer(tokens).astype(np.int64) + 1  # -1 (unseen) -> 0

    def encode(self, col: pd.Series, where: str = "data") -> np.ndarray:
        """(N,) int64 ids."""
        if self.spec.hash_buckets is None and len(self.vocab):
            ints = int_values(col)
            index = self._index("int") if ints is not None else None
            if index is not None:
                return index.get_indexer(ints).astype(np.int64) + 1
        return self.encode_tokens(as_tokens(col))

    def state(self) -> dict[str, Any]:
        return {"vocab": self.vocab, "int_vocab": self.int_vocab}

    def load_state(self, state: dict[str, Any]) -> None:
        set_state(self, state)
        if not isinstance(self.vocab, list) or not all(isinstance(v, str) for v in self.vocab):
            raise ValueError(f"feature {self.spec.name!r} has a vocabulary that is not a list of strings")
        self._lookup.clear()


@dataclass
class SharedCategoricalEncoder:
    """A categorical feature with ``share_with``: its ids come from the other feature's
    vocabulary (``ids``), so that they index that feature's embedding table."""

    spec: FeatureSpec
    ids: CategoricalEncoder
    # encoders.json written before shared vocabularies held the feature's own vocabulary;
    # such a run keeps encoding with it, as it was trained
    own: CategoricalEncoder | None = None

    @property
    def cardinality(self) -> int:
        return self.ids.cardinality

    def fit(self, col: pd.Series) -> SharedCategoricalEncoder:
        return self  # the vocabulary is the other feature's, fitted on its own column

    def encode(self, col: pd.Series, where: str = "data") -> np.ndarray:
        return (self.own if self.own is not None else self.ids).encode(col, where)

    def state(self) -> dict[str, Any]:
        return self.own.state() if self.own is not None else {}

    def load_state(self, state: dict[str, Any]) -> None:
        if state:
            log.warning(
                "feature %r (share_with %r): encoders.json holds its own vocabulary (written by an earlier "
                "funnel); it keeps encoding with it, as the run was trained",
                self.spec.name,
                self.spec.share_with,
            )
            self.own = CategoricalEncoder(self.spec)
            self.own.load_state(state)


@dataclass
class SequenceEncoder:
    """A delimited history column ("12|7|99") → (N, max_len) ids, most recent items kept."""

    spec: FeatureSpec
    ids: CategoricalEncoder  # the vocabulary used (its own, or the shared feature's)

    def fit(self, col: pd.Series) -> SequenceEncoder:
        if self.spec.share_with is None:
            self.ids.fit(self._tokens(col)[1])
        return self

    def _tokens(self, col: pd.Series) -> tuple[np.ndarray, pd.Series]:
        lists = col.map(lambda v: v if isinstance(v, (list, np.ndarray)) else None)
        if lists.notna().any():  # Parquet list column
            exploded = lists.explode()
        else:
            exploded = col.astype("string").fillna("").str.split(self.spec.sep).explode()
        exploded = exploded[exploded.notna() & (exploded.astype("string") != "")]
        rows = exploded.index.to_numpy()
        return rows, as_tokens(exploded.reset_index(drop=True))

    @property
    def cardinality(self) -> int:
        return self.ids.cardinality

    def encode(self, col: pd.Series, where: str = "data") -> np.ndarray:
        """(N, max_len) int64 ids, right-aligned, 0 = padding."""
        col = col.reset_index(drop=True)
        n, width = len(col), self.spec.max_len
        out = np.zeros((n, width), dtype=np.int64)
        rows, tokens = self._tokens(col)
        if len(rows) == 0:
            return out
        ids = self.ids.encode_tokens(tokens)
        # position from the end of each row's history: 0 = most recent
        from_end = pd.Series(rows).groupby(rows).cumcount(ascending=False).to_numpy()
        keep = from_end < width
        out[rows[keep], width - 1 - from_end[keep]] = ids[keep]  # right-aligned, newest last
        return out

    def state(self) -> dict[str, Any]:
        return self.ids.state() if self.spec.share_with is None else {}

    def load_state(self, state: dict[str, Any]) -> None:
        if self.spec.share_with is None:
            self.ids.load_state(state)
        elif state:
            raise ValueError(f"feature {self.spec.name!r} shares {self.spec.share_with!r} but has a state {state!r}")


# A value whose square overflows float32 (|x| > ~1.84e19) poisons the float32 model as surely as inf.
FLOAT32_SAFE = float(np.sqrt(np.finfo(np.float32).max))


@dataclass
class NumericEncoder:
    """Standardised numbers; missing and non-finite values follow the feature's ``missing`` policy.

    A value is *non-finite* when it is inf / -inf or, after the transform, beyond ±FLOAT32_SAFE
    (log1p(1e308) = 709 is fine, a raw 1e20 is not). ``missing: fill`` treats such values exactly
    like missing ones: the train mean, and 1 in the missing-flag column.
    """

    spec: FeatureSpec
    mean: float = 0.0
    std: float = 1.0
    flag: bool = False  # add a 0/1 "was missing" column (training data had missing or non-finite values)

    @property
    def width(self) -> int:
        return 2 if self.flag else 1

    def _values(self, col: pd.Series) -> np.ndarray:
        numeric = pd.to_numeric(col, errors="coerce")
        bad = numeric.isna() & col.notna()
        if bad.any():
            examples = ", ".join(repr(v) for v in col[bad].astype(str).unique()[:3])
            raise DataError(
                f"column {self.spec.source!r} (numeric feature {self.spec.name!r}) holds non-numeric values "
                f"({examples}); declare it `kind: categorical` or clean the column."
            )
        values = numeric.to_numpy(dtype=np.float64, na_value=np.nan)
        if self.spec.transform == "log1p":
            finite = np.isfinite(values)  # inf and -inf stay as they are: non-finite, not negative
            neg = finite & (values < 0)
            if neg.any():
                raise DataError(
                    f"column {self.spec.source!r}: transform log1p needs values >= 0, found {values[neg][0]}; "
                    "use `transform: standardize`."
                )
            values = values.copy()
            values[finite] = np.log1p(values[finite])
        return values

    @staticmethod
    def _gaps(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Masks of missing (NaN) and non-finite (inf, or beyond ±FLOAT32_SAFE) transformed values."""
        missing = np.isnan(values)
        return missing, ~missing & ~(np.abs(values) <= FLOAT32_SAFE)

    def gaps(self, col: pd.Series) -> tuple[int, int]:
        """(missing, non-finite) counts of a column; needs no fitting (for `funnel check`)."""
        missing, nonfinite = self._gaps(self._values(col))
        return int(missing.sum()), int(nonfinite.sum())

    def _refuse(self, col: pd.Series, missing: np.ndarray, nonfinite: np.ndarray, where: str) -> None:
        """Under ``missing: error``, a DataError for every kind of gap found."""
        if self.spec.missing != "error" or not (missing.any() or nonfinite.any()):
            return
        fix = (
            f"set `missing: fill` on feature {self.spec.name!r} to fill them with the train mean "
            "(and flag them), or clean the data."
        )
        problems = []
        if missing.any():
            problems.append(f"{where}: column {self.spec.source!r} has {int(missing.sum())} missing values; {fix}")
        if nonfinite.any():
            example = col.iloc[int(np.flatnonzero(nonfinite)[0])]
            example = example.item() if isinstance(example, np.generic) else example  # inf, not np.float64(inf)
            problems.append(
                f"{where}: column {self.spec.source!r} has {int(nonfinite.sum())} non-finite values (e.g. {example!r}: "
                f"inf, or beyond ±{FLOAT32_SAFE:.3g} after `transform: {self.spec.transform}`, which overflows "
                f"float32); {fix}"
            )
        raise DataError(problems)

    def fit(self, col: pd.Series) -> NumericEncoder:
        values = self._values(col)
        missing, nonfinite = self._gaps(values)
        self._refuse(col, missing, nonfinite, "train")
        gap = missing | nonfinite
        present = values[~gap]
        if len(present):  # the mean also fills missing values when transform is none
            mean, std = float(present.mean()), float(present.std())
            self.mean = mean if np.isfinite(mean) else 0.0  # finite by construction; never let NaN reach a model
            self.std = std if np.isfinite(std) and std > 0 else 1.0
        self.flag = bool(gap.any())
        if self.flag:
            log.info(
                "train: column %r (feature %r): %d missing and %d non-finite values, filled with the mean "
                "%.6g and flagged",
                self.spec.source,
                self.spec.name,
                int(missing.sum()),
                int(nonfinite.sum()),
                self.mean,
            )
        return self

    def encode(self, col: pd.Series, where: str = "data") -> np.ndarray:
        """(N, width) float32: the values, then the missing flag when there is one."""
        values = self._values(col)
        missing, nonfinite = self._gaps(values)
        self._refuse(col, missing, nonfinite, where)
        if nonfinite.any():
            log.warning(
                "%s: column %r (feature %r): %d non-finite values (inf, or beyond ±%.3g after the transform) "
                "filled with the train mean%s",
                where,
                self.spec.source,
                self.spec.name,
                int(nonfinite.sum()),
                FLOAT32_SAFE,
                " and flagged" if self.flag else "",
            )
        gap = missing | nonfinite
        values = np.where(gap, self.mean, values)
        if self.spec.transform != "none":
            values = (values - self.mean) / self.std
        cols = [values, gap.astype(np.float64)] if self.flag else [values]
        return np.stack(cols, axis=1).astype(np.float32)

    def state(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "flag": self.flag}

    def load_state(self, state: dict[str, Any]) -> None:
        set_state(self, state)
        for key in ("mean", "std"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not np.isfinite(value):
                raise ValueError(f"numeric feature {self.spec.name!r} has {key} {value!r}, not a finite number")


def set_state(encoder: Any, state: dict[str, Any]) -> None:
    """Set the fitted statistics ``state`` (from encoders.json) on ``encoder``: only the keys
    its ``state()`` writes; keys it leaves out keep their defaults."""
    known = encoder.state()
    for key, value in state.items():
        if key not in known:
            raise ValueError(f"feature {encoder.spec.name!r} has an unknown state {key!r}")
        setattr(encoder, key, value)
