"""Where a run's train / valid / test frames come from: files or the synthetic generator."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from funnel.data.io import read_table
from funnel.spec.schema import Config

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
    if d.valid:
        frames["valid"] = read_table(d.valid, d.csv, key="data.valid")
    else:
        frames["train"], frames["valid"] = holdout(frames["train"], d.valid_split, cfg.seed)
        log.info("no data.valid: holding out %.0f%% of train for validation", 100 * d.valid_split)
    if d.test:
        frames["test"] = read_table(d.test, d.csv, key="data.test")
    return frames


def holdout(df: pd.DataFrame, share: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    mask = rng.random(len(df)) < share
    return df[~mask].reset_index(drop=True), df[mask].reset_index(drop=True)
