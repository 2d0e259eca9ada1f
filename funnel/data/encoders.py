"""Feature encoders fitted on the training split only and saved as JSON with each run.

Every encoder works on whole columns (pandas / numpy vectorised); id 0 is reserved for
unknown, rare and padding values, so an unseen category at predict time is harmless.

Fitting streams: ``observe(chunk)`` accumulates one chunk's statistics (O(distinct values)
memory, see ``streaming.py``) and ``finalize()`` builds the fitted state; ``fit(col)`` is
``observe(col)`` then ``finalize()``, and chunks give exactly what one ``fit`` of their
concatenation gives.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from funnel.data.streaming import Moments, Reservoir, ValueCounts
from funnel.errors import DataError
from funnel.spec.schema import FeatureSpec

log = logging.getLogger(__name__)

MISSING_TOKEN = "<NA>"


def as_tokens(col: pd.Series) -> pd.Series:
    """Column → strings, so 12, 12.0 and "12" are the same category in every file.

    Each float is spelt on its own: 12.0 is "12" whatever else its column (or chunk) holds,
    so that a vocabulary fitted chunk by chunk, or on another file, gives the same tokens."""
    out = col.astype("string").fillna(MISSING_TOKEN).astype(object)
    if pd.api.types.is_float_dtype(col):
        values, where = col.to_numpy(np.float64, na_value=np.nan), None
    elif col.dtype == object and pd.api.types.infer_dtype(col, skipna=True) in FLOATS_INSIDE:
        cells = col.to_numpy(object)  # a loop over cells, only for object columns holding floats
        where = np.flatnonzero(np.fromiter((isinstance(v, float) for v in cells), bool, len(cells)))
        values = cells[where].astype(np.float64)
    else:
        return out
    integral = _integral(values, 2.0**63)
    if not integral.any():
        return out
    tokens = out.to_numpy(object, copy=True)
    rows = np.flatnonzero(integral) if where is None else where[integral]
    tokens[rows] = values[integral].astype(np.int64).astype(str).astype(object)
    return pd.Series(tokens, index=col.index, dtype=object)


# what pandas' infer_dtype says of object cells among which floats may be
FLOATS_INSIDE = ("floating", "mixed-integer-float", "mixed-integer", "mixed")


def _integral(values: np.ndarray, bound: float) -> np.ndarray:
    """Mask of the finite whole numbers of magnitude below ``bound`` (no warning for inf)."""
    finite = np.isfinite(values) & (np.abs(values) < bound)
    finite[finite] = np.mod(values[finite], 1) == 0
    return finite


def int_values(col: pd.Series) -> np.ndarray | None:
    """The column as int64 when it is integer-coded without missing values (12 and 12.0
    alike), else None. Such columns skip the string conversion of `as_tokens`: same ids, faster."""
    if pd.api.types.is_bool_dtype(col) or col.isna().any():
        return None
    if pd.api.types.is_integer_dtype(col):
        return col.to_numpy(np.int64)
    if pd.api.types.is_float_dtype(col):
        vals = col.to_numpy(np.float64)
        if _integral(vals, 2.0**53).all():
            return vals.astype(np.int64)
    return None


def float_values(col: pd.Series, spec: FeatureSpec) -> np.ndarray:
    """A numeric feature's column as float64 (missing cells NaN); a non-numeric cell is refused."""
    numeric = pd.to_numeric(col, errors="coerce")
    bad = numeric.isna() & col.notna()
    if bad.any():
        examples = ", ".join(repr(v) for v in col[bad].astype(str).unique()[:3])
        raise DataError(
            f"column {spec.source!r} (numeric feature {spec.name!r}) holds non-numeric values "
            f"({examples}); declare it `kind: categorical` or clean the column."
        )
    return numeric.to_numpy(dtype=np.float64, na_value=np.nan)


@dataclass
class CategoricalEncoder:
    spec: FeatureSpec
    vocab: list[str] = field(default_factory=list)
    int_vocab: bool = False  # every token is the plain text of an int64 (fitted on an integer column)
    _lookup: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # built lazily
    _counts: ValueCounts = field(default_factory=ValueCounts, repr=False, compare=False)  # observed, not final

    @property
    def cardinality(self) -> int:
        """Number of ids including the unknown id 0."""
        return (self.spec.hash_buckets or len(self.vocab)) + 1

    def observe(self, col: pd.Series) -> None:
        """Count the values of one chunk of the train split (nothing to count when hashing)."""
        if self.spec.hash_buckets is not None or not len(col):
            return
        ints = int_values(col)
        if ints is not None:
            self._counts.add_ints(ints)
        else:
            self._counts.add_tokens(as_tokens(col))

    def finalize(self) -> CategoricalEncoder:
        """The vocabulary of everything observed since the last ``finalize``."""
        if self.spec.hash_buckets is None:
            counts, self._counts = self._counts, ValueCounts()
            # integer-coded only if every chunk was: one chunk of strings makes every token a string
            self.int_vocab = counts.only_ints
            if self.int_vocab:
                values, n = counts.int_table()
                tokens = values.astype(str)
            else:
                tokens, n = counts.token_table()
            keep = n >= self.spec.min_count
            tokens, n = tokens[keep], n[keep]
            # frequency order, ties by value (as strings): deterministic and frequent ids are small
            self.vocab = tokens[np.lexsort((tokens, -n))].tolist()
            self._lookup.clear()
        return self

    def fit(self, col: pd.Series) -> CategoricalEncoder:
        self.observe(col)
        return self.finalize()

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
        ids = self.encode_tokens(as_tokens(col))
        if pd.api.types.is_float_dtype(col) and self._legacy_floats():
            # a vocabulary written before floats were spelt one by one: 12.0 may be its "12.0"
            unseen = np.flatnonzero(ids == 0)
            if len(unseen):
                ids[unseen] = self.encode_tokens(col.iloc[unseen].astype("string").astype(object))
        return ids

    def _legacy_floats(self) -> bool:
        """The vocabulary holds whole numbers spelt as floats ("12.0"): ``as_tokens`` of a float
        column with a fraction in it before funnel spelt each float on its own."""
        if self.spec.hash_buckets is not None or self.int_vocab:
            return False
        if "legacy" not in self._lookup:
            self._lookup["legacy"] = bool(pd.Series(self.vocab, dtype=object).str.fullmatch(r"-?\d+\.0").any())
        return bool(self._lookup["legacy"])

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

    def observe(self, col: pd.Series) -> None:
        pass  # the vocabulary is the other feature's, fitted on its own column

    def finalize(self) -> SharedCategoricalEncoder:
        return self

    def fit(self, col: pd.Series) -> SharedCategoricalEncoder:
        return self

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


# A value whose square overflows float32 (|x| > ~1.84e19) poisons the float32 model as surely as inf.
FLOAT32_SAFE = float(np.sqrt(np.finfo(np.float32).max))

# `transform: auto` takes log1p for a train column with no negative value and a sample skewness
# above this: Bulmer's "highly skewed" (a lognormal with sigma 1 has 6.2, an exponential 2, Adult's
# fnlwgt 1.4, a normal 0). A rare 0/1 flag passes too, harmlessly: log1p of 0/1 standardises to
# the same values
AUTO_SKEWNESS = 1.0


# transform: quantile keeps at most this many train quantiles (sklearn's QuantileTransformer default)
QUANTILES = 1000
_P_BOUND = 1e-7  # probabilities are clipped to [_P_BOUND, 1 - _P_BOUND] before Φ⁻¹: values within ±5.2


def finite_numbers(value: Any) -> np.ndarray | None:
    """A saved list of finite numbers (not booleans) as float64, else None: the check of the
    quantiles and bin edges that encoders.json gives back."""
    if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return None
    array = np.asarray(value, np.float64)
    return array if np.isfinite(array).all() else None


def quantile_normal(values: np.ndarray, quantiles: np.ndarray) -> np.ndarray:
    """Φ⁻¹ of each value's train CDF, read off ``quantiles`` (the train values at probabilities
    0, 1/(n-1), ..., 1) by linear interpolation. A value equal to several tied quantiles (a
    column mostly 0) gets the middle of their probabilities, as the mean of the interpolation
    from below and from above; values outside the train range get the clipped ends."""
    refs = np.linspace(0.0, 1.0, len(quantiles))
    up = np.interp(values, quantiles, refs)
    down = -np.interp(-values, -quantiles[::-1], -refs[::-1])
    p = np.clip(0.5 * (up + down), _P_BOUND, 1.0 - _P_BOUND)
    return torch.special.ndtri(torch.from_numpy(p)).numpy()


@dataclass
class NumericEncoder:
    """Standardised numbers; missing and non-finite values follow the feature's ``missing`` policy.

    A value is *non-finite* when it is inf / -inf or, after the transform, beyond ±FLOAT32_SAFE
    (log1p(1e308) = 709 is fine, a raw 1e20 is not). ``missing: fill`` treats such values exactly
    like missing ones: the train mean, and 1 in the missing-flag column.

    ``transform: auto`` is decided at ``finalize`` from streaming moments of the raw train values
    (so a chunked fit decides as one fit does): log1p when no value is negative and the skewness
    exceeds AUTO_SKEWNESS, else standardize. It judges gaps on the raw values. The choice is
    ``transform``, saved in encoders.json; a state written before it existed means standardize.

    ``transform: quantile`` maps a value to Φ⁻¹ of its train CDF (``quantile_normal``: about
    N(0, 1) whatever the column's shape, as sklearn's QuantileTransformer with a normal output,
    the numeric preprocessing of Gorishniy et al.'s MLPs). The CDF is read off at most QUANTILES
    train quantiles, of a seeded uniform sample of at most RESERVOIR train values, saved as
    ``quantiles``; missing and non-finite values get 0, the train median.
    """

    spec: FeatureSpec
    mean: float = 0.0
    std: float = 1.0
    flag: bool = False  # add a 0/1 "was missing" column (training data had missing or non-finite values)
    transform: str = ""  # in effect: the spec's, or what `auto` chose ("auto" until then)
    _moments: Moments = field(default_factory=Moments, repr=False, compare=False)  # observed, not final
    _log_moments: Moments = field(default_factory=Moments, repr=False, compare=False)  # of log1p, for auto
    _seen: list[int] = field(default_factory=lambda: [0, 0], repr=False, compare=False)  # missing, non-finite
    quantiles: list[float] | None = None  # transform quantile: the train quantiles, once fitted
    _sample: Reservoir = field(default_factory=Reservoir, repr=False, compare=False)  # for quantile

    def __post_init__(self) -> None:
        self.transform = self.transform or self.spec.transform

    @property
    def width(self) -> int:
        return 2 if self.flag else 1

    def _values(self, col: pd.Series, transform: str | None = None) -> np.ndarray:
        """The column as float64 after ``transform`` (default: the one in effect; auto: raw)."""
        transform = transform or self.transform
        values = float_values(col, self.spec)
        if transform == "log1p":
            finite = np.isfinite(values)  # inf and -inf stay as they are: non-finite, not negative
            neg = finite & (values < 0)
            if neg.any():
                chose = " (chosen by `transform: auto`: train had no negative values)" * (self.spec.transform == "auto")
                raise DataError(
                    f"column {self.spec.source!r}: transform log1p{chose} needs values >= 0, found "
                    f"{values[neg][0]}; use `transform: standardize`."
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

    def _refuse(
        self, col: pd.Series, missing: np.ndarray, nonfinite: np.ndarray, where: str, transform: str | None = None
    ) -> None:
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
                f"inf, or beyond ±{FLOAT32_SAFE:.3g} after `transform: {transform or self.transform}`, which overflows "
                f"float32); {fix}"
            )
        raise DataError(problems)

    def observe(self, col: pd.Series) -> None:
        """Accumulate one chunk of the train split: moments of the present values, gap counts."""
        view = self.spec.transform  # auto observes the raw values (and their log1p) until finalize
        values = self._values(col, view)
        missing, nonfinite = self._gaps(values)
        self._refuse(col, missing, nonfinite, "train", view)
        present = values[~(missing | nonfinite)]
        self._moments.add(present)
        if view == "quantile":
            self._sample.add(present)
        if view == "auto" and self._moments.low >= 0:  # log1p stays a candidate while nothing is negative
            self._log_moments.add(np.log1p(present))
        self._seen[0] += int(missing.sum())
        self._seen[1] += int(nonfinite.sum())

    def finalize(self) -> NumericEncoder:
        """Transform (for auto), mean, std and the missing flag of everything observed since the
        last ``finalize``."""
        moments, (missing, nonfinite) = self._moments, self._seen
        log_moments, self._moments, self._log_moments, self._seen = self._log_moments, Moments(), Moments(), [0, 0]
        if self.spec.transform == "auto":
            low, skewness = moments.low, moments.skewness
            skewed = moments.n > 0 and low >= 0 and skewness > AUTO_SKEWNESS
            self.transform = "log1p" if skewed else "standardize"
            moments = log_moments if skewed else moments
            log.debug(
                "train: numeric feature %r: transform auto chose %s (min %.6g, skewness %.3g)",
                self.spec.name,
                self.transform,
                low,
                skewness,
            )
        if self.transform == "quantile":
            sample, self._sample = self._sample.values, Reservoir()
            # no more values than quantiles: the sorted values are the quantiles, exactly
            q = np.sort(sample) if len(sample) <= QUANTILES else np.quantile(sample, np.linspace(0, 1, QUANTILES))
            self.quantiles = q.tolist() if len(q) >= 2 else None
            if self.quantiles is None:  # fewer than 2 train values: nothing to rank by
                log.warning(
                    "train: numeric feature %r: transform quantile saw %d values; it encodes every value as 0",
                    self.spec.name,
                    len(sample),
                )
        if moments.n:  # the mean also fills missing values when transform is none
            mean, std = moments.mean, moments.std
            self.mean = mean if np.isfinite(mean) else 0.0  # finite by construction; never let NaN reach a model
            self.std = std if np.isfinite(std) and std > 0 else 1.0
        self.flag = bool(missing or nonfinite)
        if self.flag:
            log.info(
                "train: column %r (feature %r): %d missing and %d non-finite values, filled with the mean "
                "%.6g and flagged",
                self.spec.source,
                self.spec.name,
                missing,
                nonfinite,
                self.mean,
            )
        return self

    def fit(self, col: pd.Series) -> NumericEncoder:
        self.observe(col)
        return self.finalize()

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
        if self.transform == "quantile":  # about N(0, 1) already; gaps get the median, 0
            values = np.where(gap, 0.0, self._quantile_normal(np.where(gap, 0.0, values)))
        else:
            values = np.where(gap, self.mean, values)
            if self.transform != "none":
                values = (values - self.mean) / self.std
        cols = [values, gap.astype(np.float64)] if self.flag else [values]
        return np.stack(cols, axis=1).astype(np.float32)

    def _quantile_normal(self, values: np.ndarray) -> np.ndarray:
        if self.quantiles is None:
            return np.zeros_like(values)
        return quantile_normal(values, np.asarray(self.quantiles, np.float64))

    def state(self) -> dict[str, Any]:
        out = {"mean": self.mean, "std": self.std, "flag": self.flag, "transform": self.transform}
        return out | ({"quantiles": self.quantiles} if self.transform == "quantile" else {})

    def load_state(self, state: dict[str, Any]) -> None:
        # a state without "transform" predates `auto`: then the default was standardize
        self.transform = "standardize" if self.spec.transform == "auto" else self.spec.transform
        set_state(self, state)
        if self.transform not in ("standardize", "log1p", "quantile", "none"):
            raise ValueError(
                f"numeric feature {self.spec.name!r} has transform {self.transform!r}, not standardize, log1p, "
                "quantile or none"
            )
        if self.transform == "quantile" and self.quantiles is not None:
            array = finite_numbers(self.quantiles)
            if array is None or len(array) < 2 or (np.diff(array) < 0).any():
                raise ValueError(
                    f"numeric feature {self.spec.name!r} has quantiles {self.quantiles!r}, "
                    "not 2 or more non-decreasing finite numbers"
                )
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
