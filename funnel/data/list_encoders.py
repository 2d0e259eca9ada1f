"""The encoders of id lists: ``sequence`` (padded to max_len, for attention) and ``multi_hot``
(ragged, pooled by weighted sum or mean). Their ids come from a categorical vocabulary (their
own, or the one they share), so a list item is the same id as the category of that value.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from funnel.data.encoders import CategoricalEncoder
from funnel.data.lists import Lists, read_lists
from funnel.data.table import Ragged
from funnel.errors import DataError
from funnel.spec.schema import FeatureSpec

log = logging.getLogger(__name__)


def vocabulary_of(encoder: Any) -> CategoricalEncoder:
    """The vocabulary a feature with ``share_with`` takes from its owner's encoder (a
    categorical one, or the ids of a sequence or multi-hot one)."""
    return encoder if isinstance(encoder, CategoricalEncoder) else encoder.ids


def _count_truncation(encoder: Any, where: str, rows: int, ids: int, fix: str) -> None:
    """Keep (and warn about) the rows a length cap cut: nothing is dropped silently."""
    if not rows:
        return
    seen_rows, seen_ids = encoder.truncation.get(where, (0, 0))
    encoder.truncation[where] = (seen_rows + rows, seen_ids + ids)
    spec = encoder.spec
    log.warning(
        "%s: feature %r (column %r): %d rows longer than max_len %d, %d ids dropped (each row keeps its last %d); %s",
        where,
        spec.name,
        spec.source,
        rows,
        spec.max_len,
        ids,
        spec.max_len,
        fix,
    )


class _ListVocabulary:
    """What the encoders of id lists share: their ids come from ``self.ids``, a categorical
    vocabulary fitted on the items of every list (unless the feature shares another's)."""

    spec: FeatureSpec
    ids: CategoricalEncoder

    @property
    def cardinality(self) -> int:
        return self.ids.cardinality

    def observe(self, col: pd.Series) -> None:
        if self.spec.share_with is None:
            self.ids.observe(read_lists(col, self.spec.sep).compact().values)  # missing and "" items are no items

    def finalize(self) -> Any:
        if self.spec.share_with is None:
            self.ids.finalize()
        return self

    def fit(self, col: pd.Series) -> Any:
        self.observe(col)
        return self.finalize()

    def state(self) -> dict[str, Any]:
        return self.ids.state() if self.spec.share_with is None else {}

    def load_state(self, state: dict[str, Any]) -> None:
        if self.spec.share_with is None:
            self.ids.load_state(state)
        elif state:
            raise ValueError(f"feature {self.spec.name!r} shares {self.spec.share_with!r} but has a state {state!r}")


@dataclass
class SequenceEncoder(_ListVocabulary):
    """A history column ("12|7|99", or lists) → (N, max_len) ids, most recent items kept.

    ``truncation[where]``: (rows, ids) cut by ``max_len`` in the encoded chunks of split ``where``."""

    spec: FeatureSpec
    ids: CategoricalEncoder  # the vocabulary used (its own, or the shared feature's)
    truncation: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False, compare=False)

    def _lists(self, col: pd.Series) -> Lists:
        return read_lists(col, self.spec.sep).compact()  # missing and "" items are no items

    def encode(self, col: pd.Series, where: str = "data") -> np.ndarray:
        """(N, max_len) int64 ids, right-aligned, 0 = padding."""
        width = self.spec.max_len
        lists, rows_cut, ids_cut = self._lists(col).last(width)
        _count_truncation(self, where, rows_cut, ids_cut, "raise max_len (every row is padded to it)")
        out = np.zeros((len(lists), width), dtype=np.int64)
        if lists.offsets[-1] == 0:
            return out
        ids = self.ids.encode(lists.values)
        # position from the end of each row's history: 0 = most recent
        from_end = np.repeat(lists.offsets[1:], lists.lengths) - np.arange(lists.offsets[-1]) - 1
        out[lists.rows(), width - 1 - from_end] = ids  # right-aligned, newest last
        return out


@dataclass
class MultiHotEncoder(_ListVocabulary):
    """Variable-length id lists, optionally weighted, → ``Ragged`` (ids end to end, never padded).

    Cells: an Arrow list column, lists / arrays, or strings such as "12|7|99" (see ``lists.py``);
    ids are tokenised as categorical values are, so the id 12 of a list is the category 12 of a
    table it shares. ``spec.weights`` names a column of parallel lists of weights. With
    ``max_len`` a longer list keeps its last ``max_len`` ids, counted in ``truncation[where]``
    (rows, ids) and logged."""

    spec: FeatureSpec
    ids: CategoricalEncoder  # the vocabulary used (its own, or the shared feature's)
    truncation: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False, compare=False)

    def encode(self, col: pd.Series, where: str = "data", weights: pd.Series | None = None) -> Ragged:
        """The lists of ``col`` (``weights``: the column ``spec.weights``, when the feature has one)."""
        spec = self.spec
        lists = read_lists(col, spec.sep)
        if spec.weights is not None:
            if weights is None:
                raise DataError(
                    f"{where}: multi-hot feature {spec.name!r} takes weights from column {spec.weights!r}, "
                    "which was not read; give the column or remove `weights`."
                )
            lists = Lists(lists.offsets, lists.values, lists.present, self._weights(lists, weights, where))
        lists = lists.compact()
        if spec.max_len is not None:
            lists, rows_cut, ids_cut = lists.last(spec.max_len)
            _count_truncation(self, where, rows_cut, ids_cut, "raise max_len, or remove it to keep every id")
        ids = self.ids.encode(lists.values) if len(lists.values) else np.zeros(0, np.int64)
        w = None if lists.weights is None else torch.from_numpy(lists.weights.astype(np.float32))
        return Ragged(torch.from_numpy(np.asarray(ids, np.int64)), torch.from_numpy(lists.offsets), w)

    def _weights(self, lists: Lists, col: pd.Series, where: str) -> np.ndarray:
        """(nnz,) float64: one finite weight per id of ``lists``, else a DataError naming the row."""
        spec = self.spec
        what = f"{where}: column {spec.weights!r} (weights of multi-hot feature {spec.name!r})"
        weights = read_lists(col, spec.sep)
        differ = np.flatnonzero(weights.lengths != lists.lengths) if len(weights) == len(lists) else [0]
        if len(differ):
            r = differ[0]
            raise DataError(
                f"{what}: row {_label(col, r)!r} has {weights.lengths[r]} weights for {lists.lengths[r]} ids in "
                f"column {spec.source!r} ({len(differ)} rows differ); give one weight per id, in lists of the "
                "same lengths."
            )
        values = pd.to_numeric(weights.values, errors="coerce").to_numpy(np.float64, na_value=np.nan)
        needed = np.ones(len(values), bool) if lists.present is None else lists.present  # ids that are kept
        given = np.ones(len(values), bool) if weights.present is None else weights.present
        bad = np.flatnonzero(needed & ~(given & np.isfinite(values)))
        if len(bad):
            row = int(np.searchsorted(lists.offsets, bad[0], side="right") - 1)
            if given[bad[0]]:
                example = weights.values.iloc[bad[0]]
                example = example.item() if isinstance(example, np.generic) else example  # inf, not np.float64(inf)
                found = f"the weight {example!r}, not a finite number"
            else:
                found = "a missing weight"
            raise DataError(
                f"{what}: row {_label(col, row)!r} has {found} ({len(bad)} weights in all are missing or not "
                "finite); give a finite number for every id."
            )
        return values


def _label(col: pd.Series, position: int) -> Any:
    """The index label of row ``position`` (the row number a user sees), as a plain value."""
    label = col.index[position]
    return label.item() if isinstance(label, np.generic) else label
