"""Scoring outside the training loop: metrics of a table, and prediction columns."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from funnel.data.io import read_table, write_table
from funnel.data.loader import BatchLoader
from funnel.data.table import EncodedTable
from funnel.errors import UserError
from funnel.models.registry import FunnelModel
from funnel.runs import load_run
from funnel.training.metrics import FunnelMetrics
from funnel.training.module import truth_of

log = logging.getLogger(__name__)


@torch.no_grad()
def score(model: FunnelModel, table: EncodedTable, batch_size: int):
    """Yield (batch, log_reach (B, S), log_cond (B, S)) over the table, in row order."""
    model.eval()
    names = model.graph.names
    for batch in BatchLoader(table, batch_size):
        yield (batch, *model(batch).log_stacked(names))


def evaluate_table(model: FunnelModel, table: EncodedTable, batch_size: int = 16384) -> dict[str, Any]:
    metrics = FunnelMetrics(model.graph, with_truth=bool(table.truth))
    for batch, log_reach, log_cond in score(model, table, batch_size):
        metrics.update(log_reach, log_cond, batch["labels"], truth_of(batch))
    values = metrics.compute()
    values = {k: (None if math.isnan(v) else round(v, 6)) for k, v in values.items()}
    values["rows"] = len(table)
    return values


def predict_table(model: FunnelModel, table: EncodedTable, batch_size: int = 16384) -> pd.DataFrame:
    reach, cond = [], []
    for _, log_reach, log_cond in score(model, table, batch_size):
        reach.append(log_reach.exp())
        cond.append(log_cond.exp())
    reach_np = torch.cat(reach).numpy() if reach else np.zeros((0, len(model.graph.names)))
    cond_np = torch.cat(cond).numpy() if cond else np.zeros((0, len(model.graph.names)))
    cols: dict[str, np.ndarray] = {}
    for j, name in enumerate(model.graph.names):
        cols[f"p_{name}"] = reach_np[:, j]
        cols[f"p_{name}_cond"] = cond_np[:, j]
    return pd.DataFrame(cols)


def evaluate_run(run_dir: str | Path, data: str | Path, out: str | Path | None = None) -> dict[str, Any]:
    cfg, _, featurizer, model = load_run(run_dir)
    table = featurizer.encode(read_table(data, cfg.data.csv), str(data), labels=True)
    result = evaluate_table(model, table, cfg.data.eval_batch_size)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1))
    return result


def predict_run(run_dir: str | Path, data: str | Path, out: str | Path, keep: list[str] | None = None) -> Path:
    cfg, _, featurizer, model = load_run(run_dir)
    df = read_table(data, cfg.data.csv)
    keep = keep or []
    missing = [c for c in keep if c not in df.columns]
    if missing:
        raise UserError(f"--keep: column(s) {', '.join(missing)} not in {data}.")
    table = featurizer.encode(df, str(data), labels=False)
    pred = predict_table(model, table, cfg.data.eval_batch_size)
    if keep:
        pred = pd.concat([df[keep].reset_index(drop=True), pred], axis=1)
    path = write_table(pred, out)
    log.info("wrote %d predictions to %s", len(pred), path)
    return path
