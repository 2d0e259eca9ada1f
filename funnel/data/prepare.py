"""The streaming preparation pass: raw files → fitted encoders → the encoded store on disk.

Data of any size is read in chunks (``data.chunk_rows`` rows of one shard at a time):

1. fit: every train chunk adds to the encoders' statistics (vocabulary counts with
   ``min_count``, numeric means and variances), finalised once at the end; the result equals
   one fit on the whole split (tests/test_prepare.py checks it);
2. encode: every chunk of every split is encoded and appended to the store (see store.py).

Without ``data.valid`` (and with ``data.test_split``) the held-out rows are chosen by
``data.split_seed`` in blocks of 1,000 rows (funnel/data/splits.py), the chunks re-cut at block
boundaries: the same rows as the in-memory hold-out. Memory stays flat in the number of rows:
one chunk, the vocabularies and the writers' buffers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from funnel.data.featurizer import Featurizer
from funnel.data.io import iter_table, prefetched, table_columns
from funnel.data.sources import check_split_by
from funnel.data.splits import TEST, TRAIN, VALID, Holdout, aligned, expected_splits
from funnel.data.store import SplitWriter
from funnel.spec.schema import Config

log = logging.getLogger(__name__)
ENCODERS = "encoders.json"


class _Progress:
    """A log line every ``every`` seconds with the rows done and the rate."""

    def __init__(self, what: str, every: float = 10.0):
        self.what, self.every = what, every
        self.start = self.last = time.perf_counter()
        self.rows = 0

    def add(self, rows: int) -> None:
        self.rows += rows
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            log.info("%s: %s rows (%.0f rows/s)", self.what, f"{self.rows:,}", self.rows / (now - self.start))

    def done(self) -> float:
        seconds = time.perf_counter() - self.start
        log.info(
            "%s: %s rows in %.1fs (%.0f rows/s)", self.what, f"{self.rows:,}", seconds, self.rows / max(seconds, 1e-9)
        )
        return seconds


def _chunks(cfg: Config, featurizer: Featurizer, split: str, labels: bool = True) -> Iterator[pd.DataFrame]:
    """The chunks of one split's file(s), with the columns encoding reads; a missing column is
    reported (with a did-you-mean among all of the file's columns) before any row is read."""
    path = getattr(cfg.data, split)
    header = table_columns(path, cfg.data.csv, key=f"data.{split}")
    featurizer.check_columns(pd.DataFrame(columns=header), split, labels=labels)
    columns = featurizer.wanted_columns(header, labels)
    if split == "train" and cfg.data.split_by is not None:  # the hold-out reads the key column
        check_split_by(cfg.data, header)
        columns = [*columns, *([cfg.data.split_by] if cfg.data.split_by not in columns else [])]
    return prefetched(iter_table(path, cfg.data.csv, columns, cfg.data.chunk_rows))


def _train_parts(cfg: Config, featurizer: Featurizer) -> Iterator[tuple[pd.DataFrame, np.ndarray | None]]:
    """The train file's chunks with each row's split code (funnel/data/splits.py), or None
    when nothing is held out of it: the same rows chunk after chunk as in memory."""
    held = Holdout.of(cfg.data)
    if held is None:
        yield from ((chunk, None) for chunk in _chunks(cfg, featurizer, "train"))
        return
    for chunk, last in aligned(_chunks(cfg, featurizer, "train")):
        yield chunk, held.assign(chunk, last)


def fit_streaming(cfg: Config, featurizer: Featurizer) -> None:
    """Fit ``featurizer`` on the train split (its train part when valid or test is held out)."""
    progress = _Progress("prepare: fitting the encoders on train")
    for chunk, codes in _train_parts(cfg, featurizer):
        if codes is not None:
            chunk = chunk[codes == TRAIN]
        featurizer.observe(chunk)
        progress.add(len(chunk))
    featurizer.finalize()
    progress.done()


def encode_streaming(cfg: Config, featurizer: Featurizer, directory: Path, id_dtype: np.dtype) -> dict[str, int]:
    """Encode every split into the store in ``directory``; returns the rows written per split."""
    d = cfg.data
    writers = {s: SplitWriter(directory, s, id_dtype) for s in expected_splits(cfg)}
    try:
        held = Holdout.of(d)
        progress = _Progress("prepare: encoding train" + (" and the held-out rows" if held else ""))
        for chunk, codes in _train_parts(cfg, featurizer):
            if codes is None:
                writers["train"].append(featurizer.encode(chunk, "train"))
            else:
                for code, split in ((TRAIN, "train"), (VALID, "valid"), (TEST, "test")):
                    if split in writers and (split == "train" or split in held.splits):
                        writers[split].append(featurizer.encode(chunk[codes == code].reset_index(drop=True), split))
            progress.add(len(chunk))
        progress.done()
        for split in ("valid", "test"):
            path = getattr(d, split)
            if not path:
                continue
            progress = _Progress(f"prepare: encoding {split}")
            for chunk in _chunks(cfg, featurizer, split):
                writers[split].append(featurizer.encode(chunk, split))
                progress.add(len(chunk))
            progress.done()
        for split, writer in writers.items():
            if not writer.arrays:  # no chunk at all (a header-only file): the split's arrays, 0 rows
                header = table_columns(getattr(d, split) or d.train, d.csv)
                columns = featurizer.wanted_columns(header)
                writer.append(featurizer.encode(pd.DataFrame({c: pd.Series([], dtype=object) for c in columns}), split))
        return {split: w.close()["rows"] for split, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w.abort()
        raise


def id_dtype_of(featurizer: Featurizer) -> np.dtype:
    """int32 ids when every embedding table has fewer than 2^31 rows, else int64."""
    rows = max((t.rows for t in featurizer.layout().tables), default=0)
    return np.dtype(np.int32 if rows < 2**31 else np.int64)


def prepare_store(cfg: Config, featurizer: Featurizer, directory: Path) -> dict[str, int]:
    """Fit (unless ``featurizer`` is fitted) and encode file data into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    if not featurizer.fitted:
        fit_streaming(cfg, featurizer)
    rows = encode_streaming(cfg, featurizer, directory, id_dtype_of(featurizer))
    featurizer.save(directory / ENCODERS)
    return rows
