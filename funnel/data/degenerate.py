"""Encoded data that would "train" without learning anything: empty splits, one-class stages.

Both checks run on the encoded tables (after label conflicts are dropped), so they see
exactly the rows the model would see. ``funnel check`` and the data module call
:func:`check_degenerate`; :func:`monitor_undefined` tells the trainer whether ``trainer.monitor``
can pick the best checkpoint at all.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from funnel.data.table import EncodedTable
from funnel.errors import DataError
from funnel.graph import FunnelGraph
from funnel.spec.schema import Config

REQUIRED_SPLITS = ("train", "valid")


def _empty_split(split: str, cfg: Config | None) -> str:
    data = cfg.data if cfg is not None else None
    if split == "valid" and data is not None and not data.valid and data.synthetic is None:
        return (
            f"valid: 0 rows in the share data.valid_split = {data.valid_split} held out of train; "
            "raise data.valid_split or give data.valid a file with data rows."
        )
    if split == "test" and data is not None and not data.test and data.test_split is not None:
        return (
            f"test: 0 rows in the share data.test_split = {data.test_split} held out of train; "
            "raise data.test_split or give data.test a file with data rows."
        )
    source = getattr(data, split, None) if data is not None else None
    where = f" (data.{split}: {source!r})" if source else ""
    return (
        f"{split}: 0 rows{where} once rows with label conflicts are dropped: the file is empty or header-only, "
        f"or every row is a label conflict. Give data.{split} a file with data rows."
    )


def _one_class(graph: FunnelGraph, labels: Tensor, j: int) -> str | None:
    """Why stage j cannot be learned from these (N, S) train labels, or None when it can."""
    stage = graph.stages[j]
    pos = int(torch.count_nonzero(labels[:, j]))  # no (N,) temporary: flat memory on 100M-row stores
    neg = len(labels) - pos
    if pos and neg:
        return None
    return (
        f"train: stage {stage.name!r} (label column {stage.label!r}) has {pos} positives and {neg} negatives; "
        "with a single class its AUC is undefined and the loss cannot learn it. Check the stage's "
        "`positive:` values and its label column, or remove the stage."
    )


def degenerate_problems(tables: Mapping[str, EncodedTable], graph: FunnelGraph, cfg: Config | None = None) -> list[str]:
    """Every reason the encoded ``{split: table}`` cannot train a model, all at once."""
    problems = [_empty_split(s, cfg) for s in REQUIRED_SPLITS if s in tables and len(tables[s]) == 0]
    train = tables.get("train")
    if train is not None and len(train) and train.labels is not None:
        labels = train.labels  # (N, S) in graph order
        problems += [p for j in range(len(graph.stages)) if (p := _one_class(graph, labels, j)) is not None]
    return problems


def check_degenerate(tables: Mapping[str, EncodedTable], graph: FunnelGraph, cfg: Config | None = None) -> None:
    """Raise a DataError listing every problem of :func:`degenerate_problems`; return None when there is none."""
    problems = degenerate_problems(tables, graph, cfg)
    if problems:
        raise DataError(problems)


def monitor_minority(table: EncodedTable, graph: FunnelGraph, monitor: str) -> tuple[int, str] | None:
    """(count, "positives" | "negatives") of the rarer class that the AUC ``monitor`` is computed
    over on ``table`` (the rows of its space, as in :func:`monitor_undefined`), or None when
    ``monitor`` is not a stage AUC."""
    space = _auc_labels(table, graph, monitor)
    if space is None:
        return None
    labels = space[0]
    pos = int((labels > 0).sum())
    neg = len(labels) - pos
    return (pos, "positives") if pos <= neg else (neg, "negatives")


def _auc_labels(table: EncodedTable, graph: FunnelGraph, monitor: str):
    """(labels of the AUC's space, a description of the space) for a stage AUC monitor, else None."""
    parts = monitor.split("/")
    if len(parts) != 3 or parts[1] not in ("auc", "auc_cond") or table.labels is None:
        return None
    _, kind, name = parts
    if name not in graph.names:
        return None
    j = graph.index(name)
    labels = table.labels[:, j]  # (N,)
    space = f"{len(table)} rows"
    parent = graph.stages[j].after
    if kind == "auc_cond" and parent is not None:
        rows = table.labels[:, graph.index(parent)] > 0
        labels = labels[rows]
        space = f"{int(rows.sum())} rows with {parent!r} = 1"
    return labels, space


def monitor_undefined(table: EncodedTable, graph: FunnelGraph, monitor: str) -> str | None:
    """Why the metric ``monitor`` (e.g. "val/auc_cond/conversion") is undefined on ``table``, or None.

    Follows funnel/training/metrics.py: ``auc/<s>`` is computed on all rows, ``auc_cond/<s>`` on
    the rows whose parent stage is 1 (all rows for a first stage); either needs both classes.
    ``logloss``, ``calib`` and ``loss`` are defined whenever there are rows.
    """
    if len(table) == 0:
        return "valid has 0 rows"
    found = _auc_labels(table, graph, monitor)  # None: not a stage AUC this graph logs
    if found is None:
        return None
    labels, space = found
    name = monitor.split("/")[2]
    pos = int((labels > 0).sum())
    neg = len(labels) - pos
    if pos and neg:
        return None
    which = "positives" if pos == 0 else "negatives"
    return f"valid has 0 {which} of stage {name!r} ({space})"
