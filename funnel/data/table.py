"""Encoded data held as a few contiguous tensors; a batch is an index gather of rows."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


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
        out = {"cat": self.cat, "num": self.num}
        out.update({f"seq/{k}": v for k, v in self.seq.items()})
        if self.labels is not None:
            out["labels"] = self.labels
        out.update({f"truth/{k}": v for k, v in self.truth.items()})
        return out

    def nbytes(self) -> int:
        return sum(t.element_size() * t.nelement() for t in self.tensors().values())


def take(tensors: dict[str, Tensor], idx: Tensor | slice) -> dict[str, Tensor]:
    """One batch: the same rows of every tensor (a gather, or a view for a slice)."""
    return {k: v[idx] for k, v in tensors.items()}
