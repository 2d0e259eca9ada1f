"""The feature-kind table: one entry per kind of the schema, each encoder filling its block."""

from __future__ import annotations

import json
from typing import get_args, get_type_hints

import numpy as np
import pandas as pd
import pytest
import torch

from funnel.data.encoders import CategoricalEncoder, SharedCategoricalEncoder
from funnel.data.kinds import FEATURE_KINDS, Block, new_encoders
from funnel.data.list_encoders import MultiHotEncoder, SequenceEncoder
from funnel.data.table import BAG, CAT, NUM, SEQ, Ragged
from funnel.spec.schema import FEATURE_OPTIONS, FeatureSpec

# one small column per kind; a kind added to FEATURE_KINDS needs one here
SAMPLES = {
    "categorical": pd.Series(["a", "b", "a", None]),
    "numeric": pd.Series([1.0, np.nan, 3.0, 4.0]),
    "sequence": pd.Series(["a|b", "", "b|b|c", None]),
    "multi_hot": pd.Series(["a|b", "", "b|b|c", None]),
}


def as_arrays(out):
    """An encoder's output as numpy arrays (a Ragged: its values and offsets)."""
    return [out.values.numpy(), out.offsets.numpy()] if isinstance(out, Ragged) else [out]


def test_every_kind_of_the_schema_has_one_entry_with_its_options():
    literal = get_args(get_type_hints(FeatureSpec)["kind"])
    assert list(FEATURE_KINDS) == list(FEATURE_OPTIONS) == list(literal) == list(SAMPLES)
    for name, kind in FEATURE_KINDS.items():
        assert kind.name == name and kind.options == FEATURE_OPTIONS[name]
        assert kind.block in (CAT, NUM, SEQ, BAG)
    assert get_args(Block) == (CAT, NUM, SEQ, BAG)


@pytest.mark.parametrize("name", list(FEATURE_KINDS))
def test_each_kinds_encoder_fills_its_block_and_its_state_round_trips_through_json(name):
    kind, col = FEATURE_KINDS[name], SAMPLES[name]
    spec = FeatureSpec(name="x", kind=name)
    enc = kind.make(spec, None).fit(col)
    out = enc.encode(col, "train")
    if kind.block == BAG:
        assert isinstance(out, Ragged) and len(out) == len(col) and out.values.dtype == out.offsets.dtype == torch.int64
        assert out.offsets.tolist() == [0, 2, 2, 5, 5]
    else:
        expected = {CAT: (len(col),), SEQ: (len(col), spec.max_len)}.get(
            kind.block, (len(col), getattr(enc, "width", 0))
        )
        assert out.shape == expected
        assert out.dtype == (np.float32 if kind.block == NUM else np.int64)
    fresh = kind.make(spec, None)
    fresh.load_state(json.loads(json.dumps(enc.state())))
    for a, b in zip(as_arrays(fresh.encode(col, "test")), as_arrays(out), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="unknown state 'nope'"):
        kind.make(spec, None).load_state({"nope": 1})


def test_a_feature_with_share_with_gets_the_other_features_encoder_whatever_the_order():
    item = FeatureSpec(name="item", kind="categorical")
    shop = FeatureSpec(name="shop", kind="categorical", share_with="item")
    hist = FeatureSpec(name="hist", kind="sequence", share_with="item")
    bag = FeatureSpec(name="bag", kind="multi_hot", share_with="item")
    encoders = new_encoders([hist, shop, bag, item])  # the sharers listed first
    assert list(encoders) == ["hist", "shop", "bag", "item"]
    assert isinstance(encoders["item"], CategoricalEncoder)
    assert isinstance(encoders["shop"], SharedCategoricalEncoder) and encoders["shop"].ids is encoders["item"]
    assert isinstance(encoders["hist"], SequenceEncoder) and encoders["hist"].ids is encoders["item"]
    assert isinstance(encoders["bag"], MultiHotEncoder) and encoders["bag"].ids is encoders["item"]


def test_a_feature_sharing_a_sequence_or_multi_hot_table_gets_its_vocabulary():
    tags = FeatureSpec(name="tags", kind="multi_hot")
    more = FeatureSpec(name="more", kind="multi_hot", share_with="tags")
    one = FeatureSpec(name="one", kind="categorical", share_with="tags")
    hist = FeatureSpec(name="hist", kind="sequence", share_with="tags")
    encoders = new_encoders([more, one, hist, tags])
    vocab = encoders["tags"].ids
    assert encoders["more"].ids is encoders["one"].ids is encoders["hist"].ids is vocab


@pytest.mark.parametrize("name", list(FEATURE_KINDS))
def test_fit_is_observe_then_finalize_for_every_kind(name):
    kind, col = FEATURE_KINDS[name], SAMPLES[name]
    spec = FeatureSpec(name="x", kind=name)
    whole = kind.make(spec, None).fit(pd.concat([col, col], ignore_index=True))
    chunked = kind.make(spec, None)
    chunked.observe(col)
    chunked.observe(col)
    assert chunked.finalize() is chunked
    assert chunked.state() == whole.state()
