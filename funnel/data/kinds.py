"""Every feature kind in one table: its encoder, its YAML options and the tensor block it fills.

The block says where a feature's encoding goes and what the model makes of it:

- ``CAT``: the encoder gives (N,) int64 ids, one column of ``EncodedTable.cat`` (``batch[CAT]``);
  the layout gives the feature a field that looks up an embedding table.
- ``NUM``: (N, width) float32, ``width`` columns of ``EncodedTable.num`` (``batch[NUM]``), the
  numeric input of the towers.
- ``SEQ``: (N, max_len) int64 ids, ``EncodedTable.seq[name]`` (``batch[seq_key(name)]``); a field
  whose items' embeddings are pooled.

The featurizer (fit, encode, save, load) and the layout go through this table only. To add
a kind: its options in ``funnel/spec/schema.py`` (``FEATURE_OPTIONS``, the
``FeatureSpec.kind`` literal and any new ``FeatureSpec`` field), an encoder in
``encoders.py`` that follows ``Encoder``, and one entry in ``FEATURE_KINDS``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import pandas as pd

from funnel.data.encoders import CategoricalEncoder, NumericEncoder, SequenceEncoder, SharedCategoricalEncoder
from funnel.data.table import CAT, NUM, SEQ
from funnel.spec.schema import FEATURE_OPTIONS, FeatureSpec

Block = Literal["cat", "num", "seq"]  # CAT, NUM, SEQ of table.py: the EncodedTable field a kind fills


class Encoder(Protocol):
    """What the featurizer asks of every kind's encoder."""

    spec: FeatureSpec

    def fit(self, col: pd.Series) -> Encoder: ...  # on the train split only

    def encode(self, col: pd.Series, where: str = "data") -> np.ndarray: ...  # the block's array

    def state(self) -> dict[str, Any]: ...  # the fitted statistics, JSON-ready (encoders.json)

    def load_state(self, state: dict[str, Any]) -> None: ...  # raises ValueError on a bad state

    # CAT and SEQ blocks: ``cardinality``, the rows of the feature's embedding table (id 0
    # included); NUM block: ``width``, its columns of the numeric input


@dataclass(frozen=True)
class Kind:
    name: str
    block: Block
    # (spec, the encoder of its share_with feature or None) -> a new, unfitted encoder
    make: Callable[[FeatureSpec, Any], Encoder]

    @property
    def options(self) -> frozenset[str]:
        """The YAML options this kind takes besides name, kind and column."""
        return FEATURE_OPTIONS[self.name]


def _categorical(spec: FeatureSpec, shared: CategoricalEncoder | None) -> Encoder:
    return CategoricalEncoder(spec) if shared is None else SharedCategoricalEncoder(spec, shared)


def _sequence(spec: FeatureSpec, shared: CategoricalEncoder | None) -> Encoder:
    return SequenceEncoder(spec, shared if shared is not None else CategoricalEncoder(spec))


FEATURE_KINDS: dict[str, Kind] = {
    "categorical": Kind("categorical", CAT, _categorical),
    "numeric": Kind("numeric", NUM, lambda spec, _: NumericEncoder(spec)),
    "sequence": Kind("sequence", SEQ, _sequence),
}


def kind_of(spec: FeatureSpec) -> Kind:
    return FEATURE_KINDS[spec.kind]


def new_encoders(features: Iterable[FeatureSpec]) -> dict[str, Encoder]:
    """An unfitted encoder per feature, by name, in feature order. A feature with
    ``share_with`` gets the other feature's encoder (validation made it an unshared one)."""
    features = list(features)
    made: dict[str, Encoder] = {}
    for f in sorted(features, key=lambda f: f.share_with is not None):  # owners first
        made[f.name] = kind_of(f).make(f, made[f.share_with] if f.share_with else None)
    return {f.name: made[f.name] for f in features}
