"""Encoded data held as a few contiguous tensors; a batch is an index gather of rows.

A batch is a ``dict[str, Tensor]`` whose keys are named here and nowhere else:

| key | tensor | filled by |
| --- | --- | --- |
| ``CAT`` ("cat") | (B, C) int64 ids, one column per categorical feature | ``EncodedTable.cat`` |
| ``NUM`` ("num") | (B, K) float32 numerics, missing flags, dense vectors | ``EncodedTable.num`` |
| ``seq_key(name)`` ("seq/<name>") | (B, L) int64 ids of a sequence feature, 0 = padding | ``EncodedTable.seq`` |
| ``LABELS`` ("labels") | (B, S) float32 stage labels in graph order | ``EncodedTable.labels`` |
| ``truth_key(k)`` ("truth/<k>") | (B, S) float32 ground truth of the synthetic funnel | ``EncodedTable.truth`` |
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from torch import Tensor

CAT = "cat"
NUM = "num"
LABELS = "labels"
SEQ = "seq"  # the EncodedTable field of the sequences, not a batch key: each has its seq_key(name)
SEQ_PREFIX = "seq/"
TRUTH_PREFIX = "truth/"


def seq_key(name: str) -> str:
    """The batch key of sequence feature ``name``."""
    return SEQ_PREFIX + name


def truth_key(kind: str) -> str:
    """The batch key of the ground truth ``kind`` ("true_cond", "true_reach", "cf", "free")."""
    return TRUTH_PREFIX + kind


def truth_of(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The ground-truth tensors of a batch, by kind (empty without truth)."""
    return {k.removeprefix(TRUTH_PREFIX): v for k, v in batch.items() if k.startswith(TRUTH_PREFIX)}


@dataclass
class EncodedTable:
    cat: Tensor  # (N, C) int64 ids, one column per categorical feature
    num: Tensor  # (N, K) float32, standardised numerics and missing flags
    seq: dict[str, Tensor] = field(default_factory=dict)  # name -> (N, L) int64 ids, 0 = padding
    labels: Tensor | None = None  # (N, S) float32 stage labels in graph order
    truth: dict[str, Tensor] = field(default_factory=dict)  # "true_cond" / "true_reach" / "cf": (N, S) float32
    rows: Tensor | None = None  # (N,) int64 index of each row in the source file

    def __len__(self) -> int:
        return self.cat.shape[0]

    def tensors(self) -> dict[str, Tensor]:
        """The batch keys (see the module docstring) with the whole table's tensors."""
        out = {CAT: self.cat, NUM: self.num}
        out.update({seq_key(k): v for k, v in self.seq.items()})
        if self.labels is not None:
            out[LABELS] = self.labels
        out.update({truth_key(k): v for k, v in self.truth.items()})
        return out

    def select(self, rows: Tensor) -> EncodedTable:
        """The table of the rows ``rows`` (a boolean mask or indices) selects."""

        def pick(value: Tensor | dict[str, Tensor] | None) -> Tensor | dict[str, Tensor] | None:
            if isinstance(value, dict):
                return {k: v[rows] for k, v in value.items()}
            return None if value is None else value[rows]

        return EncodedTable(**{f.name: pick(getattr(self, f.name)) for f in fields(self)})

    def nbytes(self) -> int:
        return sum(t.element_size() * t.nelement() for t in self.tensors().values())


def take(tensors: dict[str, Tensor], idx: Tensor | slice) -> dict[str, Tensor]:
    """One batch: the same rows of every tensor (a gather, or a view for a slice)."""
    return {k: v[idx] for k, v in tensors.items()}
