"""Where a run's train / valid / test frames come from: files or the synthetic generator."""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from funnel.data.io import read_table
from funnel.data.splits import Holdout, split_frame
from funnel.errors import DataError, did_you_mean
from funnel.spec.schema import Config, DataSpec

log = logging.getLogger(__name__)


def load_frames(cfg: Config) -> dict[str, pd.DataFrame]:
    """Return {"train", "valid"[, "test"]} frames; `valid` is split off train when absent."""
    d = cfg.data
    if d.synthetic is not None:
        from funnel import synthetic

        spec = d.synthetic
        log.info("generating the synthetic funnel: %d rows, stages %s, seed %d", spec.rows, spec.stages, spec.seed)
        return synthetic.split_frames(synthetic.generate(spec), spec)
    frames = {"train": read_table(d.train, d.csv, key="data.train")}
    held = Holdout.of(d)
    if held is not None:
        check_split_by(d, frames["train"].columns)
        frames |= split_frame(frames["train"], held)
        log.info("holding out of train: %s", describe(d))
    if d.valid:
        frames["valid"] = read_table(d.valid, d.csv, key="data.valid")
    if d.test:
        frames["test"] = read_table(d.test, d.csv, key="data.test")
    return frames


def describe(d: DataSpec) -> str:
    """What is held out of train, for the log: ``10% valid, 10% test (split_seed 0, by user_id)``."""
    parts = [] if d.valid else [f"{100 * d.valid_split:g}% valid"]
    if d.test_split is not None and not d.test:
        parts.append(f"{100 * d.test_split:g}% test")
    by = f", by {d.split_by}" if d.split_by else ""
    return f"{', '.join(parts)} (data.split_seed {d.split_seed}{by})"


def check_split_by(d: DataSpec, columns: Any) -> None:
    if d.split_by is not None and d.split_by not in columns:
        raise DataError(
            f"data.split_by: the train data has no column {d.split_by!r}.{did_you_mean(d.split_by, list(columns))}"
        )
