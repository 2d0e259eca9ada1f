"""Per-field id lists of converted rows (numpy), built from parsed ``field:id:value`` items.

The converters (funnel/convert.py) group a block of lines' features by field into one
``FieldLists`` per field, join the user's lists to the sample's, and write them as Arrow
list columns. (``funnel.data.table.Ragged`` is the torch twin the encoders produce.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FieldLists:
    """One field's id lists for n rows: row r holds ``ids[offsets[r]:offsets[r + 1]]`` and their weights."""

    offsets: np.ndarray  # int64, n + 1, starts at 0
    ids: np.ndarray  # int64
    weights: np.ndarray  # float32, same length as ids

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def take(self, rows: np.ndarray) -> FieldLists:
        """The lists of ``rows`` in that order; a row index of -1 gives an empty list."""
        valid = rows >= 0
        safe = np.where(valid, rows, 0)
        starts = self.offsets[safe]
        lengths = np.where(valid, self.offsets[safe + 1] - starts, 0)
        offsets = offsets_of(lengths)
        # source position of every output id: its list's start plus its place in the list
        src = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
        return FieldLists(offsets, np.asarray(self.ids[src]), np.asarray(self.weights[src]))

    def concat_rows(self, other: FieldLists) -> FieldLists:
        """Row by row, this row's ids followed by ``other``'s (both of the same length)."""
        if len(other.ids) == 0:
            return self
        if len(self.ids) == 0:
            return other
        la, lb = self.lengths(), other.lengths()
        offsets = offsets_of(la + lb)
        pos_a = np.repeat(offsets[:-1] - self.offsets[:-1], la) + np.arange(len(self.ids))
        pos_b = np.repeat(offsets[:-1] + la - other.offsets[:-1], lb) + np.arange(len(other.ids))
        ids = np.empty(offsets[-1], np.int64)
        weights = np.empty(offsets[-1], np.float32)
        ids[pos_a], ids[pos_b] = self.ids, other.ids
        weights[pos_a], weights[pos_b] = self.weights, other.weights
        return FieldLists(offsets, ids, weights)


def offsets_of(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def group_by_field(
    rows: np.ndarray, codes: np.ndarray, ids: np.ndarray, weights: np.ndarray, n_rows: int, n_fields: int
) -> list[FieldLists]:
    """Per field code 0..n_fields-1, the ids of each row in their original order (codes < 0 are dropped).

    ``rows`` must be non-decreasing (features listed line by line), so after a stable sort by
    code each field's slice is ordered by row and its offsets follow from a bincount."""
    keep = codes >= 0
    if not keep.all():
        rows, codes, ids, weights = rows[keep], codes[keep], ids[keep], weights[keep]
    order = np.argsort(codes.astype(np.int16), kind="stable")  # radix sort for 16-bit keys
    bounds = np.searchsorted(codes[order], np.arange(n_fields + 1))
    rows, ids, weights = rows[order], ids[order], weights[order]
    out = []
    for k in range(n_fields):
        a, b = bounds[k], bounds[k + 1]
        out.append(FieldLists(offsets_of(np.bincount(rows[a:b], minlength=n_rows)), ids[a:b], weights[a:b]))
    return out
