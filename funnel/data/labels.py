"""Stage labels: 0/1 columns (or string labels with `positive:` values) and label conflicts.

A conflict is a row where a stage is 1 while its parent stage is 0 (a conversion
without a click). The ESMM paper deletes such rows (``drop``); labels built as
products of independent tasks want ``zero``; ``error`` refuses the data.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from funnel.errors import DataError
from funnel.graph import FunnelGraph
from funnel.spec.schema import StageSpec

log = logging.getLogger(__name__)
DROP_WARN_SHARE = 0.05  # drop: a warning when the conflicts remove more than this share of a split's rows


def encode_label(col: pd.Series, stage: StageSpec) -> np.ndarray:
    name, column = stage.name, stage.label_column
    if col.isna().any():
        raise DataError(
            f"label column {column!r} (stage {name!r}) has {int(col.isna().sum())} missing values; "
            "fill or drop those rows."
        )
    if stage.positive is not None:
        return is_positive(col, stage.positive).to_numpy(dtype=np.float32)
    if pd.api.types.is_bool_dtype(col):
        return col.to_numpy(dtype=np.float32)
    numeric = pd.to_numeric(col, errors="coerce")
    bad = numeric.isna() | ~numeric.isin([0, 1])
    if bad.any():
        examples = ", ".join(repr(v) for v in col[bad].astype(str).unique()[:3])
        raise DataError(
            f"label column {column!r} (stage {name!r}) holds values other than 0/1 ({examples}); "
            f"list the values that mean 1 with `positive: [...]` on stage {name!r}."
        )
    return numeric.to_numpy(dtype=np.float32)


def is_positive(col: pd.Series, positive: tuple[str, ...]) -> pd.Series:
    """Rows whose label is one of the ``positive`` values: a value that reads as a finite number
    matches numerically (``1`` matches 1, 1.0, "1", " 1 " and "1.0"), any other as stripped text."""
    wanted = pd.Series([str(p).strip() for p in positive], dtype=object)
    as_number = pd.to_numeric(wanted, errors="coerce")  # parsed exactly as the column is below
    numeric = np.isfinite(as_number.to_numpy(np.float64, na_value=np.nan))
    hit = pd.Series(False, index=col.index)
    if numeric.any():
        values = col.astype(np.float64) if pd.api.types.is_bool_dtype(col) else pd.to_numeric(col, errors="coerce")
        hit |= values.isin(as_number[numeric].tolist())
    if not numeric.all():
        hit |= col.astype(str).str.strip().isin(wanted[~numeric].tolist())
    return hit


def conflict_counts(labels: np.ndarray, graph: FunnelGraph) -> dict[str, int]:
    """Rows where each stage is 1 while its parent is 0 (labels: (N, S) in graph order)."""
    out = {}
    for j, stage in enumerate(graph.stages):
        if stage.after is not None:
            p = graph.index(stage.after)
            out[stage.name] = int(((labels[:, j] > 0) & (labels[:, p] == 0)).sum())
    return out


def resolve_conflicts(labels: np.ndarray, graph: FunnelGraph, policy: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Apply the conflict policy; return the labels and a boolean mask of rows to keep."""
    counts = conflict_counts(labels, graph)
    total = sum(counts.values())
    keep = np.ones(len(labels), dtype=bool)
    if total == 0:
        return labels, keep
    detail = ", ".join(f"{k}: {v}" for k, v in counts.items() if v)
    if policy == "error":
        raise DataError(
            f"{where}: {total} label conflicts (a stage is 1 while its parent stage is 0; {detail}). "
            "Set data.label_conflicts to `drop` (delete those rows, as the ESMM paper does) or `zero` "
            "(treat the stage as 0, for labels built as products)."
        )
    labels = labels.copy()
    for j, stage in enumerate(graph.stages):  # graph order: parents are final before children
        if stage.after is None:
            continue
        bad = (labels[:, j] > 0) & (labels[:, graph.index(stage.after)] == 0)
        if policy == "zero":
            labels[bad, j] = 0.0
        else:
            keep &= ~bad
    action = "set to 0" if policy == "zero" else "dropped"
    log.info("%s: %d rows with label conflicts %s (%s)", where, total, action, detail)
    dropped = int((~keep).sum())
    if dropped > DROP_WARN_SHARE * len(labels):
        log.warning(
            "%s: data.label_conflicts: drop removed %d of %d rows (%.0f%%; %s). A stage whose label is "
            "not a subset of its parent's (two independent labels chained with `after`) wants "
            "data.label_conflicts: zero, which keeps the rows and trains the stage on the product label.",
            where,
            dropped,
            len(labels),
            100.0 * dropped / len(labels),
            detail,
        )
    return labels, keep
