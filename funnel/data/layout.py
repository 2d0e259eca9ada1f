"""The feature layout: what the model needs to know of the encoded data, and nothing else.

The data-side twin of ``funnel/models/inputs.py``'s ``InputShape``: the embedding tables
and their sizes, which field looks up which table (and which column of ``batch[CAT]``, which
``batch[seq_key(name)]``, or which ``batch[bag_key(name)]``), and the width of ``batch[NUM]``. ``Featurizer.layout()``
gives the fitted one; ``FeatureLayout.placeholder(cfg)`` gives one from the config alone,
before any data is read, to build (and so check) a model on the meta device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from funnel.data.kinds import Block, kind_of, new_encoders
from funnel.data.table import BAG, CAT, NUM, SEQ
from funnel.spec.schema import Config, FeatureSpec


@dataclass(frozen=True)
class TableLayout:
    name: str  # the feature that owns the table; others reach it with share_with
    rows: int  # ids, the unknown (and padding) id 0 included
    dim: int  # embedding width


@dataclass(frozen=True)
class FieldLayout:
    """One embedded feature: the table it looks up and where its ids are in a batch."""

    name: str
    kind: str  # the feature's kind (categorical, sequence, multi_hot)
    block: Block  # CAT: one column of batch[CAT]; SEQ: batch[seq_key(name)]; BAG: batch[bag_key(name)]
    table: str
    dim: int  # the table's width
    column: int | None = None  # CAT: its column of batch[CAT]
    pooling: str | None = None  # SEQ and BAG: mean | sum
    weighted: bool = False  # BAG: the batch has per-id weights (batch[bag_weights_key(name)])


@dataclass(frozen=True)
class PeriodicLayout:
    """A numeric feature with ``embedding: plr``: a field the model computes from its standardised
    value (``batch[NUM][:, column]``, which stays a numeric column too); see numeric_embedding.py."""

    name: str
    column: int  # its value's column of batch[NUM]
    dim: int  # the field's width
    frequencies: int
    sigma: float


@dataclass(frozen=True)
class FeatureLayout:
    tables: tuple[TableLayout, ...]  # in the feature order of their owners
    # the CAT fields in column (= feature) order, then the SEQ, then the BAG fields; a numeric
    # feature with `embedding: bins` is a CAT field with a table of its own
    fields: tuple[FieldLayout, ...]
    numeric_dim: int  # width of batch[NUM]
    periodic: tuple[PeriodicLayout, ...] = ()  # the `embedding: plr` fields, in feature order

    def __post_init__(self) -> None:
        names = [t.name for t in self.tables]
        for f in self.fields:
            if f.table not in names:
                raise ValueError(f"field {f.name!r} looks up table {f.table!r}, which is not one of {names}")

    def table(self, name: str) -> TableLayout:
        for t in self.tables:
            if t.name == name:
                return t
        raise KeyError(f"no embedding table {name!r}; tables: {[t.name for t in self.tables]}")

    def field(self, name: str) -> FieldLayout:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"no embedded feature {name!r}; fields: {[f.name for f in self.fields]}")

    def fields_of(self, kind: str) -> tuple[FieldLayout, ...]:
        """The fields of feature kind ``kind``, in layout order."""
        return tuple(f for f in self.fields if f.kind == kind)

    def fields_in(self, block: Block) -> tuple[FieldLayout, ...]:
        """The fields of one block (CAT, SEQ or BAG), in layout order."""
        return tuple(f for f in self.fields if f.block == block)

    @classmethod
    def from_encoders(
        cls,
        features: Sequence[FeatureSpec],
        embed_dim: int,
        encoders: Mapping[str, Any],
        vocab_rows: int | None = None,
    ) -> FeatureLayout:
        """The layout of ``features`` encoded by ``encoders`` (see kinds.py for each block).
        ``vocab_rows``: the rows of a table whose encoder has no vocabulary yet (unfitted)."""
        dims = {f.name: f.embed_dim or embed_dim for f in features}
        tables: list[TableLayout] = []
        cat: list[FieldLayout] = []
        seq: list[FieldLayout] = []
        bag: list[FieldLayout] = []
        numeric = 0
        periodic: list[PeriodicLayout] = []
        for f in features:
            enc, block = encoders[f.name], kind_of(f).block
            if block == NUM:
                if f.embedding == "plr":  # its value is the first of its columns
                    periodic.append(PeriodicLayout(f.name, numeric, dims[f.name], f.frequencies, f.sigma))
                numeric += enc.width
                continue
            table = f.share_with or f.name
            if f.share_with is None:
                rows = enc.cardinality
                if vocab_rows is not None and rows <= 1:  # only the unknown id: not fitted yet
                    rows = vocab_rows
                tables.append(TableLayout(f.name, rows, dims[f.name]))
            if block == CAT:
                cat.append(FieldLayout(f.name, f.kind, CAT, table, dims[table], column=len(cat)))
            elif block == SEQ:
                seq.append(FieldLayout(f.name, f.kind, SEQ, table, dims[table], pooling=f.pooling))
            elif block == BAG:
                weighted = f.weights is not None
                bag.append(FieldLayout(f.name, f.kind, BAG, table, dims[table], pooling=f.pooling, weighted=weighted))
        return cls(tables=tuple(tables), fields=(*cat, *seq, *bag), numeric_dim=numeric, periodic=tuple(periodic))

    @classmethod
    def placeholder(cls, cfg: Config, rows: int = 2) -> FeatureLayout:
        """The layout of ``cfg`` before any data is read (the config must be valid).

        Everything but two sizes is exact: a table with a vocabulary gets ``rows`` rows (a
        hashed one has its ``hash_buckets + 1``), and a numeric feature counts one column, its
        missing-flag column as absent (the fitted layout adds it when the train split had
        gaps). Enough to build a model on the meta device and catch model-config errors.
        """
        return cls.from_encoders(cfg.features, cfg.funnel.embed_dim, new_encoders(cfg.features), vocab_rows=rows)
