"""Encoded data held as a few contiguous tensors; a batch is an index gather of rows.

A batch is a ``dict[str, Tensor]`` whose keys are named here and nowhere else:

| key | tensor | filled by |
| --- | --- | --- |
| ``CAT`` ("cat") | (B, C) int64 ids, one column per categorical feature | ``EncodedTable.cat`` |
| ``NUM`` ("num") | (B, K) float32 numerics, missing flags, dense vectors | ``EncodedTable.num`` |
| ``seq_key(name)`` ("seq/<name>") | (B, L) int64 ids of a sequence feature, 0 = padding | ``EncodedTable.seq`` |
| ``bag_key(name)`` ("bag/<name>") | (nnz,) int64 ids of a multi-hot feature, rows end to end | ``.bags`` |
| ``bag_offsets_key(name)`` | (B + 1,) int64: row i is ``ids[offsets[i]:offsets[i+1]]`` | ``.bags`` |
| ``bag_weights_key(name)`` | (nnz,) float32 per-id weights (a feature with weights only) | ``.bags`` |
| ``LABELS`` ("labels") | (B, S) float32 stage labels in graph order | ``EncodedTable.labels`` |
| ``truth_key(k)`` ("truth/<k>") | (B, S) float32 ground truth of the synthetic funnel | ``EncodedTable.truth`` |
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

CAT = "cat"
NUM = "num"
LABELS = "labels"
SEQ = "seq"  # the EncodedTable field of the sequences, not a batch key: each has its seq_key(name)
BAG = "bag"  # the EncodedTable field of the multi-hot features (ragged), each under bag_key(name)
SEQ_PREFIX = "seq/"
BAG_PREFIX = "bag/"
TRUTH_PREFIX = "truth/"


def seq_key(name: str) -> str:
    """The batch key of sequence feature ``name``."""
    return SEQ_PREFIX + name


def bag_key(name: str) -> str:
    """The batch key of multi-hot feature ``name``'s ids (see ``Ragged``)."""
    return BAG_PREFIX + name


def bag_offsets_key(name: str) -> str:
    return BAG_PREFIX + name + "/offsets"


def bag_weights_key(name: str) -> str:
    return BAG_PREFIX + name + "/weights"


def truth_key(kind: str) -> str:
    """The batch key of the ground truth ``kind`` ("true_cond", "true_reach", "cf", "free")."""
    return TRUTH_PREFIX + kind


def truth_of(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The ground-truth tensors of a batch, by kind (empty without truth)."""
    return {k.removeprefix(TRUTH_PREFIX): v for k, v in batch.items() if k.startswith(TRUTH_PREFIX)}


@dataclass
class Ragged:
    """Variable-length id lists of N rows, stored end to end (never padded)."""

    values: Tensor  # (nnz,) ids (int32 on disk, int64 in a batch); 0 = unknown
    offsets: Tensor  # (N + 1,) int64, offsets[0] == 0: row i is values[offsets[i]:offsets[i+1]]
    weights: Tensor | None = None  # (nnz,) float32 per-id weights; None: every weight is 1

    def __len__(self) -> int:
        return self.offsets.shape[0] - 1

    def take(self, idx: Tensor | slice) -> Ragged:
        """The rows ``idx`` selects (a slice, or int64 indices), offsets rebased to 0."""
        if isinstance(idx, slice):
            lo, hi, _ = idx.indices(len(self))
            hi = max(hi, lo)
            start, stop = int(self.offsets[lo]), int(self.offsets[hi])
            offsets = self.offsets[lo : hi + 1] - start
            pos: slice | Tensor = slice(start, stop)
        else:
            idx = idx.nonzero().squeeze(1) if idx.dtype == torch.bool else idx.long()
            starts = self.offsets[idx]
            lengths = self.offsets[idx + 1] - starts
            offsets = torch.zeros(len(idx) + 1, dtype=torch.int64)
            torch.cumsum(lengths, 0, out=offsets[1:])
            total = int(offsets[-1])
            # position of every kept id in ``values``: its row's start plus its place in the row
            pos = torch.repeat_interleave(starts - offsets[:-1], lengths, output_size=total) + torch.arange(total)
        weights = None if self.weights is None else self.weights[pos]
        return Ragged(self.values[pos], offsets, weights)

    def nbytes(self) -> int:
        parts = [self.values, self.offsets] + ([self.weights] if self.weights is not None else [])
        return sum(t.element_size() * t.nelement() for t in parts)


@dataclass
class EncodedTable:
    cat: Tensor  # (N, C) int64 ids, one column per categorical feature
    num: Tensor  # (N, K) float32, standardised numerics and missing flags
    seq: dict[str, Tensor] = field(default_factory=dict)  # name -> (N, L) int64 ids, 0 = padding
    bags: dict[str, Ragged] = field(default_factory=dict)  # name -> the multi-hot feature's id lists
    labels: Tensor | None = None  # (N, S) float32 stage labels in graph order
    truth: dict[str, Tensor] = field(default_factory=dict)  # "true_cond" / "true_reach" / "cf": (N, S) float32
    rows: Tensor | None = None  # (N,) int64 index of each row in the source file

    def __len__(self) -> int:
        return self.cat.shape[0]

    def tensors(self) -> dict[str, Tensor]:
        """The batch keys (see the module docstring) with the whole table's tensors."""
        out = {CAT: self.cat, NUM: self.num}
        out.update({seq_key(k): v for k, v in self.seq.items()})
        for name, bag in self.bags.items():
            out.update(bag_tensors(name, bag))
        if self.labels is not None:
            out[LABELS] = self.labels
        out.update({truth_key(k): v for k, v in self.truth.items()})
        return out

    def select(self, rows: Tensor) -> EncodedTable:
        """The table of the rows ``rows`` (a boolean mask or indices) selects."""

        def pick(value: Tensor | dict[str, Tensor] | None) -> Tensor | dict[str, Tensor] | None:
            if isinstance(value, dict):
                return {k: (v.take(rows) if isinstance(v, Ragged) else v[rows]) for k, v in value.items()}
            return None if value is None else value[rows]

        return EncodedTable(**{f.name: pick(getattr(self, f.name)) for f in fields(self)})

    def nbytes(self) -> int:
        return sum(t.element_size() * t.nelement() for t in self.tensors().values())


def bag_tensors(name: str, bag: Ragged) -> dict[str, Tensor]:
    """The batch keys of one multi-hot feature."""
    out = {bag_key(name): bag.values, bag_offsets_key(name): bag.offsets}
    if bag.weights is not None:
        out[bag_weights_key(name)] = bag.weights
    return out


def _bag_names(tensors: dict[str, Tensor]) -> list[str]:
    return [
        k.removeprefix(BAG_PREFIX).removesuffix("/offsets")
        for k in tensors
        if k.startswith(BAG_PREFIX) and k.endswith("/offsets")
    ]


def take(tensors: dict[str, Tensor], idx: Tensor | slice) -> dict[str, Tensor]:
    """One batch: the same rows of every tensor (a gather, or a view for a slice); a multi-hot
    feature's ids are gathered row by row (see ``Ragged.take``). Stored dtypes are widened to
    the batch contract: ids int64, labels and numerics float32."""
    bags = _bag_names(tensors)
    skip = {k for n in bags for k in (bag_key(n), bag_offsets_key(n), bag_weights_key(n))}
    out = {k: _widen(k, v[idx]) for k, v in tensors.items() if k not in skip}
    for name in bags:
        ragged = Ragged(tensors[bag_key(name)], tensors[bag_offsets_key(name)], tensors.get(bag_weights_key(name)))
        picked = ragged.take(idx)
        picked.values = picked.values.long()
        if picked.weights is not None:
            picked.weights = picked.weights.float()
        out.update(bag_tensors(name, picked))
    return out


def _widen(key: str, value: Tensor) -> Tensor:
    """A stored block in its batch dtype (a compact store keeps int32 ids and uint8 labels)."""
    if value.dtype in (torch.int32, torch.int16, torch.uint8, torch.int8) and key != LABELS:
        return value.long()
    if value.dtype != torch.float32 and (key in (LABELS, NUM) or key.startswith(TRUTH_PREFIX)):
        return value.float()
    return value
