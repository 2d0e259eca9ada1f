"""The valid (and test) rows held out of the train file when no file is given for them.

The split is chosen by ``data.split_seed`` (default 0), never by the model's ``seed``: every
seed and every model of a ``funnel compare`` trains and is scored on the same rows.

- By row (default): the rows are taken in blocks of ``BLOCK`` consecutive rows; in each block a
  permutation seeded by (split_seed, block number) ranks the rows, and the first
  ``round(valid_split · n)`` ranks go to valid, the next ``round(test_split · n)`` to test (n: the
  block's rows). Each split is therefore the exact share of every block, and of the file up to
  the rounding of one share per 1,000 rows, and a row's split depends only on its position in
  the file. A streaming read (``funnel prepare``) gets the same rows as an in-memory one:
  :func:`aligned` re-cuts its chunks at block boundaries, so the last (short) block is seen whole.
- By key (``data.split_by: user_id``): every row of one key value goes to the split that a
  seeded hash of the value chooses, so no user is in two splits; the shares then hold on
  average over the keys, not exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import pandas as pd

from funnel.spec.schema import Config, DataSpec

BLOCK = 1000
TRAIN, VALID, TEST = 0, 1, 2
NAMES = {TRAIN: "train", VALID: "valid", TEST: "test"}


class Holdout:
    """The split of each row of the train file, chunk after chunk in file order."""

    def __init__(self, valid_share: float, test_share: float, seed: int, key: str | None = None):
        self.shares = (valid_share, test_share)
        self.seed = seed
        self.key = key
        self.start = 0  # rows assigned so far

    @classmethod
    def of(cls, data: DataSpec) -> Holdout | None:
        """The hold-out ``data`` asks for; None when valid and test both come from files."""
        valid = 0.0 if data.valid else data.valid_split
        test = 0.0 if data.test or data.test_split is None else data.test_split
        if not valid and not test:
            return None
        return cls(valid, test, data.split_seed, data.split_by)

    @property
    def splits(self) -> tuple[str, ...]:
        """The splits this hold-out takes rows for, besides train."""
        return tuple(NAMES[c] for c, share in ((VALID, self.shares[0]), (TEST, self.shares[1])) if share)

    def assign(self, chunk: pd.DataFrame, last: bool) -> np.ndarray:
        """The split code of every row of the next chunk ((n,) int8). ``last``: no rows follow
        (the final block may be short); other chunks must end on a block boundary (``aligned``)."""
        n = len(chunk)
        if self.key is not None:
            codes = self._by_key(chunk[self.key])
        else:
            if not last and (self.start + n) % BLOCK:
                raise ValueError(f"a chunk that is not the last must end on a multiple of {BLOCK} rows")
            codes = self._by_row(n)
        self.start += n
        return codes

    def _by_row(self, n: int) -> np.ndarray:
        codes = np.zeros(n, dtype=np.int8)
        valid_share, test_share = self.shares
        at = 0
        while at < n:
            block = (self.start + at) // BLOCK
            offset = (self.start + at) % BLOCK  # > 0 only if a chunk began inside a block
            size = min(BLOCK - offset, n - at)
            length = offset + size  # the block's rows: a whole block, or the file's last rows
            rank = np.random.default_rng([self.seed, block]).permutation(length)[offset : offset + size]
            n_valid = round(valid_share * length)
            n_test = round(test_share * length)
            codes[at : at + size] = np.where(rank < n_valid, VALID, np.where(rank < n_valid + n_test, TEST, TRAIN))
            at += size
        return codes

    def _by_key(self, values: pd.Series) -> np.ndarray:
        hashed = pd.util.hash_array(values.astype(str).to_numpy(dtype=object), hash_key=f"funnel{self.seed:010d}")
        u = hashed.astype(np.float64) / 2.0**64  # (n,) uniform in [0, 1) per key value
        valid_share, test_share = self.shares
        return np.where(u < valid_share, VALID, np.where(u < valid_share + test_share, TEST, TRAIN)).astype(np.int8)


def aligned(chunks: Iterable[pd.DataFrame]) -> Iterator[tuple[pd.DataFrame, bool]]:
    """``(chunk, last)`` with every chunk but the last cut at a multiple of ``BLOCK`` rows (the
    rest is carried into the next one), so that :meth:`Holdout.assign` sees the last block whole."""
    held: pd.DataFrame | None = None  # rows read but not yet given out
    ready: pd.DataFrame | None = None  # whole blocks, given out once it is known more rows follow
    for chunk in chunks:
        if not len(chunk):
            continue
        held = chunk.reset_index(drop=True) if held is None else pd.concat([held, chunk], ignore_index=True)
        cut = len(held) // BLOCK * BLOCK
        if cut:
            if ready is not None:
                yield ready, False
            ready, held = held.iloc[:cut].reset_index(drop=True), held.iloc[cut:].reset_index(drop=True)
    tail = [part for part in (ready, held) if part is not None and len(part)]
    if tail:
        yield (pd.concat(tail, ignore_index=True) if len(tail) == 2 else tail[0]), True


def expected_splits(cfg: Config) -> list[str]:
    """The splits a run's file data has: train, valid (a file or held out), and test (a file or
    held out with data.test_split)."""
    d = cfg.data
    return ["train", "valid", *(["test"] if d.test or d.test_split is not None else [])]


def split_frame(df: pd.DataFrame, holdout: Holdout) -> dict[str, pd.DataFrame]:
    """An in-memory train frame cut into train and the held-out splits."""
    codes = holdout.assign(df, last=True)
    out = {"train": df[codes == TRAIN].reset_index(drop=True)}
    for code, name in ((VALID, "valid"), (TEST, "test")):
        if name in holdout.splits:
            out[name] = df[codes == code].reset_index(drop=True)
    return out
