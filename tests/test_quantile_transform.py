"""`transform: quantile`: a numeric value as Φ⁻¹ of its train CDF (about N(0, 1) whatever the
column's shape), checked against hand-computed values."""

from __future__ import annotations

import json
from statistics import NormalDist

import numpy as np
import pandas as pd
import pytest

from funnel.data.encoders import QUANTILES, NumericEncoder, quantile_normal
from funnel.spec import config_from_dict
from funnel.spec.schema import FeatureSpec

PHI_INV = NormalDist().inv_cdf


def quantile(**kw) -> FeatureSpec:
    return FeatureSpec(name="v", kind="numeric", transform="quantile", **kw)


def test_values_get_the_inverse_normal_of_their_train_cdf_by_hand():
    # 8 train values: the quantiles are the sorted values at probabilities 0, 1/7, ..., 1
    enc = NumericEncoder(quantile()).fit(pd.Series([3.0, 0.0, 0.0, 4.0, 0.0, 1.0, 2.0, 0.0, np.nan]))
    assert enc.quantiles == [0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 3.0, 4.0] and enc.flag
    got = enc.encode(pd.Series([0.0, 1.0, 2.5, 4.0, 9.0, -3.0, np.nan]))
    lo, hi = PHI_INV(1e-7), PHI_INV(1 - 1e-7)
    expected = [
        PHI_INV(3 / 14),  # 0 is tied over probabilities 0..3/7: the middle of its mass
        PHI_INV(4 / 7),  # the 5th of 8 quantiles
        PHI_INV((5 / 7 + 6 / 7) / 2),  # halfway between the quantiles 2 and 3
        hi,  # the train maximum: probability 1, clipped
        hi,  # above the train range
        lo,  # below it
        0.0,  # missing: the median, and flagged
    ]
    np.testing.assert_allclose(got[:, 0], expected, rtol=1e-6, atol=1e-6)
    assert got[:, 1].tolist() == [0, 0, 0, 0, 0, 0, 1]


def test_a_continuous_column_comes_out_standard_normal():
    rng = np.random.default_rng(0)
    train = pd.Series(rng.lognormal(3, 1.5, 20_000))  # skewness about 30
    enc = NumericEncoder(quantile()).fit(train)
    assert len(enc.quantiles) == QUANTILES
    z = enc.encode(pd.Series(rng.lognormal(3, 1.5, 20_000)))[:, 0]
    assert abs(z.mean()) < 0.03 and abs(z.std() - 1) < 0.03
    assert np.all(np.diff(enc.encode(pd.Series(np.sort(train.to_numpy())))[:, 0]) >= 0)  # order kept


def test_a_chunked_fit_equals_one_fit():
    rng = np.random.default_rng(1)
    col = pd.Series(np.round(rng.exponential(2.0, 5_000), 1))
    whole = NumericEncoder(quantile()).fit(col)
    streamed = NumericEncoder(quantile())
    bounds = [0, 7, 1_000, 1_000, 3_333, 5_000]  # one chunk empty: it changes nothing
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        streamed.observe(col.iloc[start:end])
    streamed.finalize()
    assert streamed.state() == whole.state()


def test_tied_quantiles_are_the_middle_of_their_mass_on_both_sides():
    q = np.array([1.0, 1.0, 2.0, 2.0, 2.0])  # probabilities 0, .25, .5, .75, 1
    got = quantile_normal(np.array([1.0, 1.5, 2.0]), q)
    np.testing.assert_allclose(got, [PHI_INV(0.125), PHI_INV(0.375), PHI_INV(0.75)], rtol=1e-9)


def test_the_state_round_trips_through_json_and_a_bad_one_is_refused():
    enc = NumericEncoder(quantile()).fit(pd.Series([5.0, 1.0, 3.0]))
    loaded = NumericEncoder(quantile())
    loaded.load_state(json.loads(json.dumps(enc.state())))
    x = pd.Series([0.0, 2.0, 4.0, 6.0])
    assert loaded.quantiles == [1.0, 3.0, 5.0] and np.array_equal(loaded.encode(x), enc.encode(x))
    for bad in ([3.0, 1.0], [1.0], [1.0, float("inf")], ["a", "b"]):
        with pytest.raises(ValueError, match="quantiles .* not 2 or more non-decreasing finite numbers"):
            NumericEncoder(quantile()).load_state({**enc.state(), "quantiles": bad})


def test_a_column_of_one_value_encodes_as_zero(caplog):
    enc = NumericEncoder(quantile()).fit(pd.Series([7.0]))
    assert enc.quantiles is None and "saw 1 values" in caplog.text
    assert enc.encode(pd.Series([7.0, 100.0]))[:, 0].tolist() == [0.0, 0.0]


def test_the_config_accepts_quantile_and_names_it_among_the_transforms():
    raw = {
        "data": {"train": "unused.csv"},
        "features": [{"name": "price", "kind": "numeric", "transform": "quantile", "embedding": "plr"}],
        "funnel": {"stages": [{"name": "click"}]},
    }
    assert config_from_dict(raw).features[0].transform == "quantile"
    raw["features"][0]["transform"] = "quantiles"
    with pytest.raises(Exception, match="quantile"):
        config_from_dict(raw)
