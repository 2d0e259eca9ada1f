"""Batches as index gathers over tensors (in memory or memory-mapped): no Dataset, no collate.

Training order of an epoch (``order``), drawn from ``seed + epoch`` so runs are reproducible:

- ``"global"``: one permutation of all rows (int32 while the rows fit). The best mixing; on
  data far larger than RAM every batch reads pages from all over the store's files.
- ``"blocks"``: the rows in blocks of ``block_rows`` consecutive rows; the blocks in a random
  order, ``buffer_blocks`` of them at a time mixed by one permutation. A batch then reads a
  few contiguous regions (page cache and read-ahead stay useful) and the order's memory is
  one buffer, not one index per row. Mixing is local to a buffer: rows of one block land
  within one buffer's batches (funnel/data/prepare.py writes rows in file order, so a file
  sorted by time or user gives correlated buffers: raise buffer_blocks, or shuffle the file).

Under DDP the ``world_size`` processes split the order: rank r takes every world_size-th row
of it (of each buffer), cut so that every rank has as many rows, so the ranks' batch b
together are the rows the one-process batch b of world_size times the size would hold.
Evaluation loaders (no shuffle) give each rank one contiguous range of the rows instead, all
of them (no padding, no row twice): metrics synchronised across ranks cover the split once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from funnel.data.table import EncodedTable, take


class BatchLoader:
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
        order: str = "global",
        block_rows: int = 65_536,
        buffer_blocks: int = 16,
    ):
        self.tensors = table.tensors()
        self.n = len(table)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.order = order
        self.block_rows = block_rows
        self.buffer_blocks = buffer_blocks
        self.epoch = 0
        # the epoch to draw the permutation of: the trainer's, so that a resumed run sees the
        # order the uninterrupted run would have (else the count of iterations so far)
        self.epoch_of = epoch_of

    # ---- the order of one epoch, as segments of row indices (or one slice) -------------------
    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed + self.epoch)

    def _index_dtype(self) -> torch.dtype:
        return torch.int32 if self.n < 2**31 else torch.int64

    def _segments(self) -> Iterator[Tensor | slice]:
        """This rank's rows of the epoch, in order, as index tensors or slices."""
        w, r = self.world_size, self.rank
        if not self.shuffle:
            if w == 1:
                yield slice(0, self.n)  # contiguous slices: views, no gather at all
            else:
                yield slice(r * self.n // w, (r + 1) * self.n // w)
            return
        gen = self._generator()
        if self.order == "global":
            idx = torch.randperm(self.n, generator=gen, dtype=self._index_dtype())
            yield idx if w == 1 else idx[r::w][: self.n // w]
            return
        for start, stop in self._buffers(gen):
            idx = torch.cat([torch.arange(a, b, dtype=self._index_dtype()) for a, b in zip(start, stop, strict=True)])
            idx = idx[torch.randperm(len(idx), generator=gen)]
            yield idx if w == 1 else idx[r::w][: len(idx) // w]

    def _buffers(self, gen: torch.Generator) -> list[tuple[list[int], list[int]]]:
        """The blocks order: per buffer, the (starts, stops) of its blocks. Drawn first, so
        that the per-buffer permutations that follow use the generator in a fixed order."""
        blocks = -(-self.n // self.block_rows)
        order = torch.randperm(blocks, generator=gen).tolist()
        out = []
        for i in range(0, blocks, self.buffer_blocks):
            chosen = order[i : i + self.buffer_blocks]
            out.append(
                ([b * self.block_rows for b in chosen], [min((b + 1) * self.block_rows, self.n) for b in chosen])
            )
        return out

    def _rows(self) -> int:
        """This rank's rows in the current epoch."""
        w = self.world_size
        if not self.shuffle:
            return (self.rank + 1) * self.n // w - self.rank * self.n // w
        if w == 1:
            return self.n
        if self.order == "global":
            return self.n // w
        return sum(sum(b - a for a, b in zip(*buf, strict=True)) // w for buf in self._buffers(self._generator()))

    def __len__(self) -> int:
        rows = self._rows()
        return rows // self.batch_size if self.drop_last else -(-rows // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        if self.epoch_of is not None:
            self.epoch = self.epoch_of()
        batches = len(self)
        segments = self._segments()
        self.epoch += 1
        yield from self._batches(segments, batches)

    def _batches(self, segments: Iterator[Tensor | slice], batches: int) -> Iterator[dict[str, Tensor]]:
        """Cut the segments into ``batches`` batches of ``batch_size`` rows (a batch may span two
        segments; the last may be short)."""
        b, pending = 0, None  # the rows of a batch begun in the previous segment
        for seg in segments:
            if isinstance(seg, slice):
                for lo in range(seg.start, seg.stop, self.batch_size):
                    if b == batches:
                        return
                    yield take(self.tensors, slice(lo, min(lo + self.batch_size, seg.stop)))
                    b += 1
                continue
            if pending is not None:
                seg = torch.cat([pending, seg])
                pending = None
            full = len(seg) - len(seg) % self.batch_size
            for lo in range(0, full, self.batch_size):
                if b == batches:
                    return
                yield take(self.tensors, seg[lo : lo + self.batch_size])
                b += 1
            if full < len(seg):
                pending = seg[full:]
        if pending is not None and b < batches:
            yield take(self.tensors, pending)
