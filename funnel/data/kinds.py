"""Every feature kind in one table: its encoder, its YAML options and the tensor block it fills.

The block says where a feature's encoding goes and what the model makes of it:

- ``CAT``: the encoder gives (N,) int64 ids, one column of ``EncodedTable.cat`` (``batch[CAT]``);
  the layout gives the feature a field that looks up an embedding table.
- ``NUM``: (N, width) float32, ``width`` columns of ``EncodedTable.num`` (``batch[NUM]``), the
  numeric input of the towers.
- ``SEQ``: (N, max_len) int64 ids, ``EncodedTable.seq[name]`` (``batch[seq_key(name)]``); a field
  whose items' embeddings are pooled.
- ``BAG``: a ``Ragged`` (ids end to end, (N + 1,) offsets, optional per-id weights),
  ``EncodedTable.bags[name]`` (``batch[bag_key(name)]`` and its offsets and weights keys); a
  field whose ids' embeddings are pooled (weighted sum or mean, one ``embedding_bag``).

Fitting streams: every encoder ``observe``s chunks of the train split and then ``finalize``s;
``fit(col)`` is the two on one column.

The featurizer (fit, encode, save, load) and the layout go through this table only. To add
a kind: its options in ``funnel/spec/schema.py`` (``FEATURE_OPTIONS``, the
``FeatureSpec.kind`` literal and any new ``FeatureSpec`` field), an encoder in
``encoders.py`` (or ``list_encoders.py``) that follows ``Encoder``, and one entry in ``FEATURE_KINDS``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import pandas as pd

from funnel.data.encoders import CategoricalEncoder, NumericEncoder, SharedCategoricalEncoder
from funnel.data.list_encoders import MultiHotEncoder, SequenceEncoder, vocabulary_of
from funnel.data.numeric_bins import QuantileBinEncoder
from funnel.data.table import BAG, CAT, NUM, SEQ, Ragged
from funnel.spec.schema import FEATURE_OPTIONS, FeatureSpec

Block = Literal["cat", "num", "seq", "bag"]  # CAT, NUM, SEQ, BAG of table.py: the EncodedTable field a kind fills


class Encoder(Protocol):
    """What the featurizer asks of every kind's encoder."""

    spec: FeatureSpec

    def observe(self, col: pd.Series) -> None: ...  # one chunk of the train split: accumulate statistics

    def finalize(self) -> Encoder: ...  # the fitted state from everything observed

    def fit(self, col: pd.Series) -> Encoder: ...  # observe(col), then finalize()

    # the block's array (BAG: a Ragged; MultiHotEncoder.encode also takes weights=df[spec.weights])
    def encode(self, col: pd.Series, where: str = "data") -> np.ndarray | Ragged: ...

    def state(self) -> dict[str, Any]: ...  # the fitted statistics, JSON-ready (encoders.json)

    def load_state(self, state: dict[str, Any]) -> None: ...  # raises ValueError on a bad state

    # CAT, SEQ and BAG blocks: ``cardinality``, the rows of the feature's embedding table (id 0
    # included); NUM block: ``width``, its columns of the numeric input. SEQ and BAG: ``truncation``,
    # split -> (rows, ids) that max_len cut


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


# ``shared``: the encoder of the share_with feature (categorical, sequence or multi-hot), whose
# vocabulary the new encoder uses
def _categorical(spec: FeatureSpec, shared: Any) -> Encoder:
    return CategoricalEncoder(spec) if shared is None else SharedCategoricalEncoder(spec, vocabulary_of(shared))


def _sequence(spec: FeatureSpec, shared: Any) -> Encoder:
    return SequenceEncoder(spec, vocabulary_of(shared) if shared is not None else CategoricalEncoder(spec))


def _multi_hot(spec: FeatureSpec, shared: Any) -> Encoder:
    return MultiHotEncoder(spec, vocabulary_of(shared) if shared is not None else CategoricalEncoder(spec))


FEATURE_KINDS: dict[str, Kind] = {
    "categorical": Kind("categorical", CAT, _categorical),
    "numeric": Kind("numeric", NUM, lambda spec, _: NumericEncoder(spec)),
    "sequence": Kind("sequence", SEQ, _sequence),
    "multi_hot": Kind("multi_hot", BAG, _multi_hot),
}


# a numeric feature with ``embedding: bins``: its bin ids are a CAT column with a table of its own
# (``embedding: plr`` stays in NUM: the model embeds the standardised value, see layout.py)
NUMERIC_BINS = Kind("numeric", CAT, lambda spec, _: QuantileBinEncoder(spec))


def kind_of(spec: FeatureSpec) -> Kind:
    if spec.kind == "numeric" and spec.embedding == "bins":
        return NUMERIC_BINS
    return FEATURE_KINDS[spec.kind]


def new_encoders(features: Iterable[FeatureSpec]) -> dict[str, Encoder]:
    """An unfitted encoder per feature, by name, in feature order. A feature with
    ``share_with`` gets the other feature's encoder (validation made it an unshared one)."""
    features = list(features)
    made: dict[str, Encoder] = {}
    for f in sorted(features, key=lambda f: f.share_with is not None):  # owners first
        made[f.name] = kind_of(f).make(f, made[f.share_with] if f.share_with else None)
    return {f.name: made[f.name] for f in features}
