"""The two sides of a split export: the user's features (encoded once per request) and the
candidate item's (encoded for every candidate).

``--split user=user_id,user_age,history`` names the user side; every other feature the model's
embeddings read is an item feature. Each side is encoded exactly as the whole model encodes its
rows, with its own inputs (``cat``, ``num``, ``seq__<name>``, ``bag__<name>__*``: the columns of
the side's features, in feature order), so that a batch of full rows splits into a user batch
and an item batch (:func:`split_batch`) and joins back (:func:`join_batches`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from funnel.data.featurizer import Featurizer
from funnel.data.layout import FeatureLayout, FieldLayout
from funnel.data.table import BAG, CAT, NUM, SEQ, bag_key, bag_offsets_key, bag_weights_key, seq_key
from funnel.errors import UserError, did_you_mean
from funnel.export.graph import GraphInput, graph_inputs
from funnel.export.manifest import numeric_columns
from funnel.models.embedding import SharedEmbeddings

SIDES = ("user", "item")


@dataclass(frozen=True)
class Side:
    """One side's features and where its columns sit among the whole model's."""

    name: str  # "user" | "item"
    features: tuple[str, ...]  # in feature order
    layout: FeatureLayout  # the side's fields (its ``cat`` columns renumbered from 0) and numerics
    cat_columns: tuple[int, ...]  # its columns of the whole ``cat``
    num_columns: tuple[int, ...]  # its columns of the whole ``num``
    inputs: tuple[GraphInput, ...]  # the side graph's encoded inputs (empty blocks left out)

    def keys(self) -> list[str]:
        return [i.key for i in self.inputs]

    @property
    def batch_input(self) -> GraphInput:
        """An input with a row per batch row (a bag's offsets: one more)."""
        return next(i for i in self.inputs if i.shape[0] in ("batch", "batch+1"))


def parse_split(text: str) -> list[str]:
    """``user=a,b,c`` -> ``["a", "b", "c"]`` (the user side's features)."""
    side, sep, names = text.partition("=")
    listed = [n.strip() for n in names.split(",") if n.strip()]
    if not sep or side.strip() != "user" or not listed:
        raise UserError(
            f"--split: {text!r} is not `user=FEATURE,FEATURE,...`; name the features computed once per request "
            "(the user and the request context), e.g. --split user=user_id,user_age,history."
        )
    return listed


def make_sides(featurizer: Featurizer, used: list[str], user: list[str], seq_lengths: dict[str, int]) -> list[Side]:
    """The user side (``user``) and the item side (the rest of ``used``, the features the model's
    embeddings read); every name must be one of them and neither side may be empty."""
    problems = [
        f"--split: {n!r} is not a feature the model reads.{did_you_mean(n, used)} Its features: {', '.join(used)}."
        for n in user
        if n not in used
    ]
    if problems:
        raise UserError(problems)
    items = [n for n in used if n not in user]
    if not items:
        raise UserError(
            "--split: every feature is on the user side; leave the candidate's features (item id, category, ...) out."
        )
    layout = featurizer.layout()
    columns = numeric_columns(featurizer)
    sides = []
    for name, features in (("user", [n for n in used if n in user]), ("item", items)):
        keep = set(features)
        fields, cat_columns = [], []
        for f in layout.fields:
            if f.name not in keep:
                continue
            if f.block == CAT:
                cat_columns.append(f.column)
                f = dataclasses.replace(f, column=len(cat_columns) - 1)
            fields.append(f)
        tables = tuple(t for t in layout.tables if t.name in {f.table for f in fields})
        num = tuple(i for i, c in enumerate(columns) if c["feature"] in keep)
        # a PLR feature's field is computed from its column of the side's own `num`
        periodic = tuple(dataclasses.replace(p, column=num.index(p.column)) for p in layout.periodic if p.name in keep)
        sub = FeatureLayout(tables=tables, fields=tuple(fields), numeric_dim=len(num), periodic=periodic)
        inputs = [
            i
            for i in graph_inputs(sub, {f: n for f, n in seq_lengths.items() if f in keep})
            if not (i.key == CAT and not cat_columns) and not (i.key == NUM and not num)
        ]
        sides.append(Side(name, tuple(features), sub, tuple(cat_columns), num, tuple(inputs)))
    return sides


def side_embeddings(full: SharedEmbeddings, side: Side) -> SharedEmbeddings:
    """Tables for one side's fields holding ``full``'s trained rows (a table both sides read, such
    as the item table of a user's history, is in both)."""
    part = SharedEmbeddings(side.layout)
    with torch.no_grad():
        for table in part.table_names:
            part.table_weight(table).copy_(full.table_weight(table))
    for key, module in part.periodic.items():  # the PLR embeddings of the side's numeric features
        module.load_state_dict(full.periodic[key].state_dict())
    return part.eval()


def flat_positions(full: SharedEmbeddings, side: Side) -> list[int]:
    """Where each column of the side's ``flat`` sits in the whole model's ``flat``: the fields'
    embedding widths in layout order, then the numeric columns."""
    keep, at, positions = set(side.features), 0, []
    for name, dim in full.shape.field_dims.items():
        if name in keep:
            positions.extend(range(at, at + dim))
        at += dim
    return positions + [at + c for c in side.num_columns]


def _block_of(f: FieldLayout) -> list[str]:
    if f.block == SEQ:
        return [seq_key(f.name)]
    if f.block == BAG:
        return [bag_key(f.name), bag_offsets_key(f.name)] + ([bag_weights_key(f.name)] if f.weighted else [])
    return []


def split_batch(batch: dict[str, Tensor], side: Side) -> dict[str, Tensor]:
    """The side's part of a batch of whole rows (the side graph's inputs, by batch key)."""
    out: dict[str, Tensor] = {}
    if side.cat_columns:
        out[CAT] = batch[CAT][:, list(side.cat_columns)]
    if side.num_columns:
        out[NUM] = batch[NUM][:, list(side.num_columns)]
    for f in side.layout.fields:
        out.update({k: batch[k] for k in _block_of(f)})
    return out


def _repeat_rows(side: Side, part: dict[str, Tensor], rows: int) -> dict[str, Tensor]:
    """A one-row side batch as ``rows`` identical rows."""
    out = {k: part[k].expand(rows, *part[k].shape[1:]) for k in (CAT, NUM) if k in part}
    for f in side.layout.fields:
        if f.block == SEQ:
            out[seq_key(f.name)] = part[seq_key(f.name)].expand(rows, -1)
        elif f.block == BAG:
            n = int(part[bag_offsets_key(f.name)][-1])
            ids = part[bag_key(f.name)][:n]
            out[bag_key(f.name)] = ids.repeat(rows)
            out[bag_offsets_key(f.name)] = torch.arange(rows + 1, dtype=torch.int64) * n
            if f.weighted:
                out[bag_weights_key(f.name)] = part[bag_weights_key(f.name)][:n].repeat(rows)
    return out


def join_batches(sides: list[Side], user: dict[str, Tensor], item: dict[str, Tensor]) -> dict[str, Tensor]:
    """Whole rows from a user batch (one row, repeated for every candidate, or one per candidate)
    and an item batch: what the unsplit graph takes for the same request."""
    user_side, item_side = sides
    rows = rows_of(item_side, item)
    if rows_of(user_side, user) == 1 and rows != 1:
        user = _repeat_rows(user_side, user, rows)
    out = {**user, **item}
    n_cat = len(user_side.cat_columns) + len(item_side.cat_columns)
    n_num = len(user_side.num_columns) + len(item_side.num_columns)
    cat = torch.zeros(rows, n_cat, dtype=torch.int64)
    num = torch.zeros(rows, n_num, dtype=torch.float32)
    for side, part in ((user_side, user), (item_side, item)):
        if side.cat_columns:
            cat[:, list(side.cat_columns)] = part[CAT]
        if side.num_columns:
            num[:, list(side.num_columns)] = part[NUM]
    out[CAT], out[NUM] = cat, num
    return out


def rows_of(side: Side, part: dict[str, Tensor]) -> int:
    """The rows of a side batch: an input's batch axis (a bag's offsets have one more)."""
    first = side.batch_input
    return part[first.key].shape[0] - (1 if first.shape[0] == "batch+1" else 0)
