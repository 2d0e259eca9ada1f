"""Batches as index gathers over in-memory tensors: no Dataset, no per-sample collate."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from funnel.data.table import EncodedTable, take


class BatchLoader:
    """Iterate a table in batches of ``batch_size`` rows.

    With ``shuffle`` each epoch draws a fresh permutation from ``seed + epoch`` (so runs
    are reproducible), and each batch is the gather ``tensor[perm[i:i+B]]``. Under DDP
    each of ``world_size`` processes takes every ``world_size``-th row of the permutation,
    truncated so all ranks see the same number of batches.
    """

    def __init__(
        self,
        table: EncodedTable,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        epoch_of: Callable[[], int] | None = None,
    ):
        self.tensors = table.tensors()
        self.n = len(table)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.epoch = 0
        # the epoch to draw the permutation of: the trainer's, so that a resumed run sees the
        # order the uninterrupted run would have (else the count of iterations so far)
        self.epoch_of = epoch_of

    def _indices(self) -> Tensor | None:
        if not self.shuffle and self.world_size == 1:
            return None  # contiguous slices: views, no gather at all
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            idx = torch.randperm(self.n, generator=gen)
        else:
            idx = torch.arange(self.n)
        per_rank = self.n // self.world_size
        return idx[self.rank :: self.world_size][:per_rank]

    def _rows(self) -> int:
        return self.n if self.world_size == 1 else self.n // self.world_size

    def __len__(self) -> int:
        rows = self._rows()
        return rows // self.batch_size if self.drop_last else -(-rows // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        if self.epoch_of is not None:
            self.epoch = self.epoch_of()
        idx = self._indices()
        self.epoch += 1
        rows = self._rows()
        for b in range(len(self)):
            lo, hi = b * self.batch_size, min((b + 1) * self.batch_size, rows)
            yield take(self.tensors, slice(lo, hi) if idx is None else idx[lo:hi])
