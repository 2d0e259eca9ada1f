"""What a report shows of one run, read from its directory: metrics, curves and fresh scores.

The curves come from ``logs/metrics.csv``; the scores from the best checkpoint, re-scored on the
split metrics.json was computed on (test, else valid), chunk by chunk. Only the first
``max_rows`` rows of that split are scored: enough for stable bins, bounded time and memory.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from funnel.data.io import iter_table, table_columns
from funnel.errors import UserError
from funnel.inference import predict_table
from funnel.runs import CONFIG, METRICS, METRICS_VALID, load_run
from funnel.spec.schema import Config

log = logging.getLogger(__name__)

CURVES = "logs/metrics.csv"
MAX_ROWS = 1_000_000


@dataclass
class StageScores:
    """One stage's scores on the scored rows (all 1-D float32, one entry per row)."""

    name: str
    after: str | None
    p: np.ndarray  # p_<stage>: the path probability
    p_cond: np.ndarray  # p_<stage>_cond: given ``after``
    label: np.ndarray
    parent: np.ndarray  # bool: the ``after`` stage happened (all True for a first stage)
    true_p: np.ndarray | None = None  # the generator's truth, when the data has it
    true_cond: np.ndarray | None = None
    counterfactual: np.ndarray | None = None  # the stage's draw had its ``after`` stage happened


@dataclass
class RunData:
    """Everything a report draws for one run."""

    name: str
    path: Path
    stages: list[str]
    metrics: dict[str, Any]
    metrics_valid: dict[str, Any] | None
    curves: pd.DataFrame  # logs/metrics.csv as written (empty without it)
    split: str
    rows: int  # rows scored
    split_rows: int | None  # rows of the whole split (metrics.json's count)
    scores: dict[str, StageScores] = field(default_factory=dict)

    @property
    def has_truth(self) -> bool:
        return any(s.true_p is not None for s in self.scores.values())


def is_run(path: Path) -> bool:
    return (path / CONFIG).is_file() and (path / METRICS).is_file()


def gather(
    run_dir: str | Path, name: str | None = None, max_rows: int = MAX_ROWS, trust_plugins: bool = False
) -> RunData:
    """Read and score the run in ``run_dir`` (see the module docstring)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not (run_dir / CONFIG).is_file():
        raise UserError(
            f"{str(run_dir)!r} is not a funnel run directory (no {CONFIG}). "
            "Pass the folder `funnel fit` printed, or a `funnel compare` output folder."
        )
    if not (run_dir / METRICS).is_file():
        raise UserError(f"{run_dir}: no {METRICS}. Did `funnel fit` finish? A report needs a finished run.")
    cfg, graph, featurizer, model = load_run(run_dir, trust_plugins)
    metrics = _read_json(run_dir / METRICS)
    valid = _read_json(run_dir / METRICS_VALID) if (run_dir / METRICS_VALID).is_file() else None
    split = str(metrics.get("split", "test"))
    parts: list[pd.DataFrame] = []
    rows = 0
    for df in _split_chunks(cfg, split, featurizer, max_rows):
        table = featurizer.encode(df, f"{split} (report)", labels=True)
        pred = predict_table(model, table, cfg.data.eval_batch_size)
        labels = table.labels.numpy()
        for j, s in enumerate(graph.names):
            pred[f"label_{s}"] = labels[:, j]
            for kind in ("true_reach", "true_cond", "cf"):
                if kind in table.truth:
                    pred[f"{kind}_{s}"] = table.truth[kind][:, j].numpy()
        parts.append(pred)
        rows += len(pred)
    if not rows:
        raise UserError(f"{run_dir}: the {split} split has no rows to score.")
    scored = pd.concat(parts, ignore_index=True)
    scores = {}
    for stage in graph.stages:
        s = stage.name
        parent = (
            scored[f"label_{stage.after}"].to_numpy() > 0 if stage.after else np.ones(rows, dtype=bool)
        )  # the rows where p_<s>_cond is defined
        scores[s] = StageScores(
            name=s,
            after=stage.after,
            p=scored[f"p_{s}"].to_numpy(np.float32),
            p_cond=scored[f"p_{s}_cond"].to_numpy(np.float32),
            label=scored[f"label_{s}"].to_numpy(np.float32),
            parent=parent,
            true_p=_optional(scored, f"true_reach_{s}"),
            true_cond=_optional(scored, f"true_cond_{s}"),
            counterfactual=_optional(scored, f"cf_{s}"),
        )
    return RunData(
        name=name or run_dir.name,
        path=run_dir,
        stages=list(graph.names),
        metrics=metrics,
        metrics_valid=valid,
        curves=read_curves(run_dir),
        split=split,
        rows=rows,
        split_rows=metrics.get("rows"),
        scores=scores,
    )


def _optional(df: pd.DataFrame, col: str) -> np.ndarray | None:
    return df[col].to_numpy(np.float32) if col in df.columns else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot be read as JSON ({exc}).") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: is not a JSON object of metrics.")
    return data


def read_curves(run_dir: Path) -> pd.DataFrame:
    """logs/metrics.csv (one row per logging step; epoch-level values on their own rows)."""
    path = run_dir / CURVES
    if not path.is_file():
        return pd.DataFrame()
    try:
        return pd.read_csv(path)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        log.warning("%s: cannot be read (%s); the report has no curves", path, exc)
        return pd.DataFrame()


def _split_chunks(cfg: Config, split: str, featurizer: Any, max_rows: int) -> Iterator[pd.DataFrame]:
    """The first ``max_rows`` rows of ``split``, as training made it, in chunks."""
    d = cfg.data
    chunk = max(1, min(d.chunk_rows, max_rows))
    if d.synthetic is not None or (split == "valid" and not d.valid) or (split == "test" and not d.test):
        from funnel.data.sources import load_frames  # generated (seeded), or held out of train (seeded)

        frame = load_frames(cfg)[split].iloc[:max_rows]
        yield from (frame.iloc[i : i + chunk] for i in range(0, len(frame), chunk))
        return
    path = d.test if split == "test" else d.valid
    if not path:
        raise UserError(f"the run's config has no data.{split} to score.")
    columns = featurizer.wanted_columns(table_columns(path, d.csv, key=f"data.{split}"))
    left = max_rows
    for df in iter_table(path, d.csv, columns, chunk):
        yield df.iloc[:left]
        left -= len(df)
        if left <= 0:
            return


def funnel_counts(run: RunData) -> dict[str, dict[str, float]]:
    """stage -> observed (Σ labels), predicted (Σ p_<stage>) and truth (Σ true_p, else NaN)."""
    out = {}
    for name, s in run.scores.items():
        out[name] = {
            "observed": float(s.label.astype(np.float64).sum()),
            "predicted": float(s.p.astype(np.float64).sum()),
            "truth": float(s.true_p.astype(np.float64).sum()) if s.true_p is not None else math.nan,
        }
    return out
