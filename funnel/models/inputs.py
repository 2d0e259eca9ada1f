"""What every tower receives: the stage's view of the shared embeddings and numerics."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class InputShape:
    """Static sizes a tower constructor needs (known before any tensor exists)."""

    flat_dim: int  # width of TowerInput.flat
    field_dims: dict[str, int]  # embedding width per categorical/sequence feature
    numeric_dim: int  # width of TowerInput.numeric
    sequence_fields: tuple[str, ...] = ()  # the names in field_dims that are sequences (TowerInput.sequences)


@dataclass
class TowerInput:
    flat: Tensor  # (B, flat_dim): all pooled embeddings and numerics, concatenated
    fields: dict[str, Tensor]  # feature name -> (B, E) embedding (sequences pooled)
    numeric: Tensor  # (B, numeric_dim)
    sequences: dict[str, tuple[Tensor, Tensor]]  # name -> ((B, L, E) embeddings, (B, L) bool mask)


def module_key(name: str) -> str:
    """A user-chosen name as an ``nn.ModuleDict`` key: prefixed so that stage or feature
    names such as ``apply`` or ``type`` never clash with Module attributes, and without
    dots, which module paths reserve."""
    return "m_" + name.replace(".", "_dot_")
