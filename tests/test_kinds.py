"""The feature-kind table: one entry per kind of the schema, each encoder filling its block."""

from __future__ import annotations

import json
from typing import get_args, get_type_hints

import numpy as np
import pandas as pd
import pytest

from funnel.data.encoders import CategoricalEncoder, SequenceEncoder, SharedCategoricalEncoder
from funnel.data.kinds import FEATURE_KINDS, Block, new_encoders
from funnel.data.table import CAT, NUM, SEQ
from funnel.spec.schema import FEATURE_OPTIONS, FeatureSpec

# one small column per kind; a kind added to FEATURE_KINDS needs one here
SAMPLES = {
    "categorical": pd.Series(["a", "b", "a", None]),
    "numeric": pd.Series([1.0, np.nan, 3.0, 4.0]),
    "sequence": pd.Series(["a|b", "", "b|b|c", None]),
}


def test_every_kind_of_the_schema_has_one_entry_with_its_options():
    literal = get_args(get_type_hints(FeatureSpec)["kind"])
    assert list(FEATURE_KINDS) == list(FEATURE_OPTIONS) == list(literal) == list(SAMPLES)
    for name, kind in FEATURE_KINDS.items():
        assert kind.name == name and kind.options == FEATURE_OPTIONS[name]
        assert kind.block in (CAT, NUM, SEQ)
    assert get_args(Block) == (CAT, NUM, SEQ)


@pytest.mark.parametrize("name", list(FEATURE_KINDS))
def test_each_kinds_encoder_fills_its_block_and_its_state_round_trips_through_json(name):
    kind, col = FEATURE_KINDS[name], SAMPLES[name]
    spec = FeatureSpec(name="x", kind=name)
    enc = kind.make(spec, None).fit(col)
    out = enc.encode(col, "train")
    expected = {CAT: (len(col),), SEQ: (len(col), spec.max_len)}.get(kind.block, (len(col), getattr(enc, "width", 0)))
    assert out.shape == expected
    assert out.dtype == (np.float32 if kind.block == NUM else np.int64)
    fresh = kind.make(spec, None)
    fresh.load_state(json.loads(json.dumps(enc.state())))
    np.testing.assert_array_equal(fresh.encode(col, "test"), out)
    with pytest.raises(ValueError, match="unknown state 'nope'"):
        kind.make(spec, None).load_state({"nope": 1})


def test_a_feature_with_share_with_gets_the_other_features_encoder_whatever_the_order():
    item = FeatureSpec(name="item", kind="categorical")
    shop = FeatureSpec(name="shop", kind="categorical", share_with="item")
    hist = FeatureSpec(name="hist", kind="sequence", share_with="item")
    encoders = new_encoders([hist, shop, item])  # the sharers listed first
    assert list(encoders) == ["hist", "shop", "item"]
    assert isinstance(encoders["item"], CategoricalEncoder)
    assert isinstance(encoders["shop"], SharedCategoricalEncoder) and encoders["shop"].ids is encoders["item"]
    assert isinstance(encoders["hist"], SequenceEncoder) and encoders["hist"].ids is encoders["item"]
