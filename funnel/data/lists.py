"""Columns of variable-length lists (multi-hot ids, histories, their weights) read end to end.

A list column arrives in one of three shapes, all read into the same ``Lists``:

- an Arrow list column (``pd.ArrowDtype(pa.list_(...))``, what the Parquet reader hands over):
  flattened by pyarrow without a Python loop;
- strings such as ``"12|7|99"`` (CSV): split on ``sep`` by pyarrow (pandas' ``str.split``
  when pyarrow is not installed); a missing cell or ``""`` is an empty list;
- object cells holding lists, tuples or numpy arrays (frames made by hand): a Python loop,
  acceptable at that size. A numeric column is one id per cell (a missing value: none).

Items keep a dtype the categorical tokeniser understands (int64 ids stay int64), so that the
list item 12 and the category 12 are the same token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

LIST_LIKE = (list, tuple, np.ndarray)


@dataclass(frozen=True)
class Lists:
    """N lists end to end: row i is ``values[offsets[i]:offsets[i+1]]``."""

    offsets: np.ndarray  # (N + 1,) int64, offsets[0] == 0
    values: pd.Series  # (nnz,) the items, index 0..nnz-1
    present: np.ndarray | None = None  # (nnz,) bool: False for a missing or "" item; None: all present
    weights: np.ndarray | None = None  # (nnz,) float64 per-item weights, carried along by ``keep``

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def rows(self) -> np.ndarray:
        """(nnz,) the row of every item."""
        return np.repeat(np.arange(len(self), dtype=np.int64), self.lengths)

    def keep(self, mask: np.ndarray) -> Lists:
        """The items where ``mask`` is True, each row's order kept."""
        if mask.all():
            return self
        kept = np.bincount(self.rows()[mask], minlength=len(self))
        offsets = np.zeros(len(self) + 1, dtype=np.int64)
        np.cumsum(kept, out=offsets[1:])
        present = None if self.present is None else self.present[mask]
        weights = None if self.weights is None else self.weights[mask]
        return Lists(offsets, self.values[mask].reset_index(drop=True), present, weights)

    def compact(self) -> Lists:
        """Without the missing and empty items."""
        if self.present is None:
            return self
        kept = self.keep(self.present)
        return Lists(kept.offsets, kept.values, None, kept.weights)

    def last(self, max_len: int) -> tuple[Lists, int, int]:
        """Every row cut to its last ``max_len`` items, with the rows cut and the items dropped."""
        lengths = self.lengths
        over = lengths > max_len
        if not over.any():
            return self, 0, 0
        ends = self.offsets[1:]
        from_end = np.repeat(ends, lengths) - np.arange(self.offsets[-1]) - 1  # 0 = the row's last item
        return self.keep(from_end < max_len), int(over.sum()), int((lengths[over] - max_len).sum())


def read_lists(col: pd.Series, sep: str) -> Lists:
    """The lists of ``col`` in any of the shapes of the module docstring."""
    col = col.reset_index(drop=True)
    if isinstance(col.dtype, pd.ArrowDtype) and _is_arrow_list(col.dtype):
        import pyarrow as pa

        return _from_arrow(pa.array(col))
    if isinstance(col.dtype, pd.ArrowDtype) or pd.api.types.is_string_dtype(col.dtype):
        kind = pd.api.types.infer_dtype(col, skipna=True)
        if kind in ("string", "empty"):
            return _from_strings(col, sep)
        if col.dtype == object:
            return _from_objects(col, sep)
    if pd.api.types.is_bool_dtype(col.dtype) or isinstance(col.dtype, pd.CategoricalDtype):
        return _from_objects(col.astype(object), sep)
    # one id per cell (an integer-coded column read from CSV); a missing cell has none
    present = col.notna().to_numpy()
    offsets = np.zeros(len(col) + 1, dtype=np.int64)
    np.cumsum(present, out=offsets[1:])
    return Lists(offsets, col[present].reset_index(drop=True))


def _is_arrow_list(dtype: pd.ArrowDtype) -> bool:
    import pyarrow as pa

    t = dtype.pyarrow_dtype
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _from_arrow(arr: Any) -> Lists:  # a pyarrow list array (pyarrow is optional: no annotation)
    import pyarrow as pa
    import pyarrow.compute as pc

    lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False)
    offsets = np.zeros(len(arr) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = pc.list_flatten(arr)  # a null list has no items; a slice's offsets are rebased
    if pa.types.is_dictionary(flat.type):
        flat = flat.cast(flat.type.value_type)
    present = None
    if flat.null_count:
        present = pc.is_valid(flat).to_numpy(zero_copy_only=False)
        # filled so that int64 ids stay int64 in pandas (a null would turn them into floats)
        flat = pc.fill_null(flat, "" if pa.types.is_string(flat.type) or pa.types.is_large_string(flat.type) else 0)
    values = flat.to_pandas()
    if values.dtype != object and pd.api.types.is_string_dtype(values.dtype):
        values = values.astype(object)
    if pd.api.types.is_string_dtype(values.dtype) or values.dtype == object:
        empty = (values.astype("string").fillna("") == "").to_numpy()
        if empty.any():
            present = ~empty if present is None else present & ~empty
    return Lists(offsets, values.reset_index(drop=True), present)


def _from_strings(col: pd.Series, sep: str) -> Lists:
    text = col.astype("string")
    text = text.mask(text.fillna("") == "", pd.NA)  # "" is an empty list, not a list of one ""
    arrow = pyarrow_or_none()
    if arrow is None:  # pandas alone: split, then read the lists (a loop over cells)
        return _from_objects(text.str.split(sep, regex=False).astype(object), sep)
    pa, pc = arrow
    arr = pa.array(text.astype(object), type=pa.string(), from_pandas=True)
    return _from_arrow(pc.split_pattern(arr, pattern=sep))


def pyarrow_or_none() -> tuple[Any, Any] | None:
    """(pyarrow, pyarrow.compute), or None where the optional pyarrow is not installed."""
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
    except ImportError:
        return None
    return pa, pc


def _missing(v: object) -> bool:
    return v is None or v is pd.NA or v is pd.NaT or (isinstance(v, float) and math.isnan(v))


def _from_objects(col: pd.Series, sep: str) -> Lists:
    """Object cells: lists / tuples / arrays, delimited strings, single ids or missing values."""
    lengths = np.zeros(len(col), dtype=np.int64)
    items: list[object] = []
    for i, v in enumerate(col.to_numpy(object)):
        if isinstance(v, LIST_LIKE):
            part = list(v)
        elif isinstance(v, str):
            part = v.split(sep) if v else []
        elif _missing(v):
            part = []
        else:
            part = [v]  # a single id
        lengths[i] = len(part)
        items.extend(part)
    offsets = np.zeros(len(col) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = pd.Series(items, dtype=object if not items else None)
    if values.dtype != object and pd.api.types.is_string_dtype(values.dtype):
        values = values.astype(object)  # pandas' "str" dtype: the tokeniser reads plain objects
    present = values.notna().to_numpy()
    if values.dtype == object and len(values):
        present = present & (values.astype("string").fillna("") != "").to_numpy()
    return Lists(offsets, values, None if present.all() else present)
