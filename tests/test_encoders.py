"""Tests for funnel.data: feature encoders, the Featurizer, stage labels and label conflicts."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pandas as pd
import pytest
import torch

from funnel.data.encoders import CategoricalEncoder, NumericEncoder
from funnel.data.featurizer import Featurizer
from funnel.data.labels import conflict_counts, encode_label, resolve_conflicts
from funnel.data.layout import TableLayout
from funnel.data.list_encoders import SequenceEncoder
from funnel.errors import DataError
from funnel.graph import FunnelGraph
from funnel.runs import build_graph
from funnel.spec import config_from_dict
from funnel.spec.schema import FeatureSpec, StageSpec


def cat(**kw) -> FeatureSpec:
    return FeatureSpec(name=kw.pop("name", "x"), kind="categorical", **kw)


def num(**kw) -> FeatureSpec:
    return FeatureSpec(name=kw.pop("name", "x"), kind="numeric", **kw)


def seq(**kw) -> FeatureSpec:
    return FeatureSpec(name=kw.pop("name", "x"), kind="sequence", **kw)


# ---- categorical -------------------------------------------------------------------------------------


def test_vocabulary_is_frequency_ordered_and_unknown_maps_to_zero():
    enc = CategoricalEncoder(cat()).fit(pd.Series(["b", "a", "a", "c", "c", "c"]))
    assert enc.vocab == ["c", "a", "b"]
    assert enc.cardinality == 4  # 3 values + the unknown id 0
    assert enc.encode(pd.Series(["a", "b", "c", "zzz"])).tolist() == [2, 3, 1, 0]


def test_min_count_sends_rare_values_to_zero():
    enc = CategoricalEncoder(cat(min_count=2)).fit(pd.Series(["a", "a", "b", "c", "c", "c"]))
    assert enc.vocab == ["c", "a"]
    assert enc.encode(pd.Series(["a", "b", "c"])).tolist() == [2, 0, 1]


def test_vocabulary_comes_from_train_only(tmp_path):
    cfg = make_cfg([{"name": "u", "kind": "categorical"}])
    train = pd.DataFrame({"u": ["a", "a", "b"], "click": [1, 0, 0]})
    valid = pd.DataFrame({"u": ["c", "c", "c", "b", "a"], "click": [0, 0, 0, 0, 1]})
    fz = Featurizer(cfg, build_graph(cfg)).fit(train)
    assert fz.cat["u"].vocab == ["a", "b"]
    assert fz.encode(valid, "valid").cat[:, 0].tolist() == [0, 0, 0, 2, 1]


def test_int_float_and_string_spellings_are_one_category():
    enc = CategoricalEncoder(cat()).fit(pd.Series([12, 13, 13]))
    assert enc.vocab == ["13", "12"]
    for spelling in (pd.Series([12, 13]), pd.Series([12.0, 13.0]), pd.Series(["12", "13"])):
        assert enc.encode(spelling).tolist() == [2, 1]


def test_missing_category_is_its_own_value():
    enc = CategoricalEncoder(cat()).fit(pd.Series([1.0, np.nan, np.nan]))
    assert enc.vocab == ["<NA>", "1"]
    assert enc.encode(pd.Series([np.nan, 1.0, 2.0])).tolist() == [1, 2, 0]


def test_hashing_gives_ids_in_one_to_n_and_is_deterministic():
    values = pd.Series([f"v{i}" for i in range(1000)])
    enc = CategoricalEncoder(cat(hash_buckets=7)).fit(values)
    ids = enc.encode(values)
    assert enc.cardinality == 8 and enc.vocab == []
    assert ids.min() >= 1 and ids.max() <= 7
    assert set(ids.tolist()) == set(range(1, 8))  # 1000 values fill all 7 buckets
    again = CategoricalEncoder(cat(hash_buckets=7)).encode(values)  # a fresh, unfitted encoder
    np.testing.assert_array_equal(ids, again)
    # the same category in another spelling hashes to the same bucket
    assert enc.encode(pd.Series([12])).tolist() == enc.encode(pd.Series(["12"])).tolist()


# ---- numeric -------------------------------------------------------------------------------------------


def test_standardize_uses_train_mean_and_population_std():
    enc = NumericEncoder(num()).fit(pd.Series([1.0, 2.0, 3.0, 4.0]))
    std = math.sqrt(1.25)  # mean 2.5; squared deviations 2.25, .25, .25, 2.25 over 4
    assert enc.mean == 2.5 and enc.std == pytest.approx(std)
    out = enc.encode(pd.Series([1.0, 4.0, 6.0]))
    assert out.shape == (3, 1) and out.dtype == np.float32
    np.testing.assert_allclose(out[:, 0], [-1.5 / std, 1.5 / std, 3.5 / std], rtol=1e-6)


def test_log1p_then_standardize():
    e = math.e
    enc = NumericEncoder(num(transform="log1p")).fit(pd.Series([0.0, e - 1, e**2 - 1]))
    # log1p gives 0, 1, 2: mean 1, population std sqrt(2/3)
    assert enc.mean == pytest.approx(1.0) and enc.std == pytest.approx(math.sqrt(2 / 3))
    out = enc.encode(pd.Series([e**3 - 1, 0.0]))
    np.testing.assert_allclose(out[:, 0], [2 / math.sqrt(2 / 3), -1 / math.sqrt(2 / 3)], rtol=1e-6)


def test_transform_none_keeps_raw_values():
    enc = NumericEncoder(num(transform="none")).fit(pd.Series([10.0, 20.0]))
    np.testing.assert_allclose(enc.encode(pd.Series([5.0, 30.0]))[:, 0], [5.0, 30.0])


def test_constant_column_divides_by_one():
    enc = NumericEncoder(num()).fit(pd.Series([3.0, 3.0]))
    assert enc.std == 1.0
    np.testing.assert_allclose(enc.encode(pd.Series([3.0, 5.0]))[:, 0], [0.0, 2.0])


def test_missing_values_are_filled_with_train_mean_and_flagged():
    enc = NumericEncoder(num()).fit(pd.Series([1.0, np.nan, 3.0]))
    assert enc.flag and enc.width == 2
    assert enc.mean == 2.0 and enc.std == 1.0  # from the present values only
    out = enc.encode(pd.Series([np.nan, 3.0, 0.0]))
    np.testing.assert_allclose(out, [[0.0, 1.0], [1.0, 0.0], [-2.0, 0.0]])


def test_missing_fill_without_transform_uses_the_raw_mean():
    enc = NumericEncoder(num(transform="none")).fit(pd.Series([1.0, np.nan, 5.0]))
    np.testing.assert_allclose(enc.encode(pd.Series([np.nan]))[0], [3.0, 1.0])


def test_no_flag_column_when_train_has_no_missing_values():
    enc = NumericEncoder(num()).fit(pd.Series([1.0, 3.0]))
    assert not enc.flag
    out = enc.encode(pd.Series([np.nan, 3.0]))
    np.testing.assert_allclose(out, [[0.0], [1.0]])  # filled with the mean, standardised to 0


def test_missing_error_policy_raises_data_error():
    with pytest.raises(DataError, match="column 'x' has 1 missing values; set `missing: fill`"):
        NumericEncoder(num(missing="error")).fit(pd.Series([1.0, np.nan]))


def test_non_numeric_strings_raise_data_error_naming_the_column():
    spec = num(name="price", column="price_raw")
    with pytest.raises(DataError) as err:
        NumericEncoder(spec).fit(pd.Series(["1.5", "abc", "2"]))
    msg = str(err.value)
    assert "column 'price_raw'" in msg and "numeric feature 'price'" in msg and "'abc'" in msg
    assert "kind: categorical" in msg


def test_numeric_strings_are_accepted():
    enc = NumericEncoder(num(transform="none")).fit(pd.Series(["1.5", "2.5"]))
    np.testing.assert_allclose(enc.encode(pd.Series(["4"]))[:, 0], [4.0])


def test_log1p_of_negative_values_is_a_data_error():
    with pytest.raises(DataError, match="log1p needs values >= 0"):
        NumericEncoder(num(transform="log1p")).fit(pd.Series([1.0, -2.0]))


# ---- numeric: non-finite values -------------------------------------------------------------------------------
# inf, -inf and values beyond sqrt(float32 max) ~ 1.84e19 after the transform count like missing values.


def test_non_finite_values_are_counted_after_the_transform():
    raw = pd.Series([1.8e19, 1.9e19, -1.9e19, np.inf, -np.inf, np.nan, 1e308, 0.0])
    # non-finite: 1.9e19, -1.9e19, inf, -inf and 1e308; 1.8e19 and 0 are fine
    assert NumericEncoder(num(transform="none")).gaps(raw) == (1, 5)
    assert NumericEncoder(num()).gaps(raw) == (1, 5)
    # log1p: 1.8e19, 1.9e19 and 1e308 become 44.3, 44.4 and 709.2, inf stays inf (-1.9e19 is negative: dropped)
    assert NumericEncoder(num(transform="log1p")).gaps(raw.drop(2)) == (1, 2)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, 1e308, 1e20])
def test_fill_treats_a_non_finite_train_value_like_a_missing_one(bad):
    enc = NumericEncoder(num()).fit(pd.Series([1.0, bad, 3.0, bad]))
    assert (enc.mean, enc.std, enc.flag) == (2.0, 1.0, True)  # from 1 and 3 only
    out = enc.encode(pd.Series([bad, 3.0, np.nan, 0.0]))
    np.testing.assert_allclose(out, [[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [-2.0, 0.0]])


def test_log1p_keeps_huge_finite_values_and_fills_infinite_ones():
    e = math.e
    enc = NumericEncoder(num(transform="log1p")).fit(pd.Series([e - 1, np.inf, e**3 - 1, -np.inf]))
    # -inf is non-finite, not a negative value; log1p gives 1 and 3: mean 2, std 1
    assert (enc.mean, enc.std, enc.flag) == (pytest.approx(2.0), pytest.approx(1.0), True)
    out = enc.encode(pd.Series([1e308, 1e20, np.inf, -np.inf]))
    log_1e308, log_1e20 = 308 * math.log(10), 20 * math.log(10)  # log1p(x) = log(x) at these sizes
    np.testing.assert_allclose(out[:, 0], [log_1e308 - 2, log_1e20 - 2, 0.0, 0.0], rtol=1e-5, atol=1e-6)
    assert out[:, 1].tolist() == [0.0, 0.0, 1.0, 1.0]


def test_transform_none_fills_non_finite_values_with_the_raw_mean():
    enc = NumericEncoder(num(transform="none")).fit(pd.Series([1.0, 1e20, 5.0]))
    assert enc.mean == 3.0 and enc.flag
    np.testing.assert_allclose(enc.encode(pd.Series([1e20, 7.0])), [[3.0, 1.0], [7.0, 0.0]])


def test_fitted_statistics_are_always_finite():
    many = NumericEncoder(num()).fit(pd.Series([1e308] * 5 + [1.0, 3.0]))  # 1e308 squared overflows float64 too
    assert (many.mean, many.std) == (2.0, 1.0)
    only = NumericEncoder(num()).fit(pd.Series([np.inf, -np.inf, 1e30]))  # nothing usable: the defaults
    assert (only.mean, only.std, only.flag) == (0.0, 1.0, True)
    near = NumericEncoder(num()).fit(pd.Series([1.8e19, -1.8e19]))  # the largest accepted values
    assert math.isfinite(near.mean) and math.isfinite(near.std) and near.std > 0
    assert np.isfinite(near.encode(pd.Series([1.8e19, np.inf]))).all()


def test_missing_error_policy_names_the_non_finite_count_and_an_example():
    spec = num(name="price", column="price_raw", missing="error")
    with pytest.raises(DataError) as err:
        NumericEncoder(spec).fit(pd.Series([1.0, np.inf, 2.0, -np.inf]))
    msg = str(err.value)
    assert "train: column 'price_raw' has 2 non-finite values (e.g. inf" in msg
    assert "set `missing: fill` on feature 'price'" in msg


def test_missing_error_policy_refuses_non_finite_values_at_encode_time():
    enc = NumericEncoder(num(missing="error")).fit(pd.Series([1.0, 2.0]))
    with pytest.raises(DataError, match=r"valid: column 'x' has 1 non-finite values \(e.g. 1e\+20"):
        enc.encode(pd.Series([1.0, 1e20]), "valid")


def test_missing_error_policy_reports_missing_and_non_finite_values_together():
    with pytest.raises(DataError) as err:
        NumericEncoder(num(missing="error")).fit(pd.Series([np.nan, np.inf, 1.0]))
    assert len(err.value.problems) == 2
    assert "1 missing values" in err.value.problems[0] and "1 non-finite values" in err.value.problems[1]


def test_non_finite_values_at_predict_time_are_filled_and_warned(caplog):
    enc = NumericEncoder(num()).fit(pd.Series([1.0, 3.0]))
    assert not enc.flag
    with caplog.at_level(logging.WARNING, logger="funnel.data.encoders"):
        out = enc.encode(pd.Series([np.inf, 3.0, -np.inf]), "predict.csv")
    np.testing.assert_allclose(out, [[0.0], [1.0], [0.0]])  # the train mean, standardised
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "predict.csv: column 'x'" in record.getMessage() and "2 non-finite values" in record.getMessage()


def test_finite_values_at_encode_time_log_no_warning(caplog):
    enc = NumericEncoder(num()).fit(pd.Series([1.0, 3.0]))
    with caplog.at_level(logging.WARNING, logger="funnel.data.encoders"):
        enc.encode(pd.Series([np.nan, 2.0]), "valid")
    assert caplog.records == []


def test_fit_logs_the_missing_and_non_finite_counts(caplog):
    with caplog.at_level(logging.INFO, logger="funnel.data.encoders"):
        NumericEncoder(num(name="age")).fit(pd.Series([1.0, np.nan, np.inf, 1e20, 3.0]))
    [record] = caplog.records
    assert record.levelno == logging.INFO
    assert "column 'age'" in record.getMessage() and "1 missing and 2 non-finite" in record.getMessage()


def test_featurizer_encodes_an_infinite_train_value_as_a_flagged_mean():
    cfg = make_cfg([{"name": "price", "kind": "numeric"}])
    df = pd.DataFrame({"price": [1.0, np.inf, 3.0], "click": [1, 0, 0]})
    table = Featurizer(cfg, build_graph(cfg)).fit(df).encode(df, "train")
    assert table.num.tolist() == [[-1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]


# ---- sequences -------------------------------------------------------------------------------------------


def test_sequence_keeps_the_most_recent_items_right_aligned():
    enc = SequenceEncoder(seq(max_len=2), CategoricalEncoder(seq(max_len=2)))
    enc.fit(pd.Series(["3|1|2", "5"]))
    assert enc.ids.vocab == ["1", "2", "3", "5"]  # ties in frequency: by value
    out = enc.encode(pd.Series(["3|1|2", "5", "", None, "2|9"]))
    assert out.tolist() == [[1, 2], [0, 4], [0, 0], [0, 0], [2, 0]]  # unknown 9 -> 0


def test_sequence_shorter_than_max_len_is_left_padded():
    enc = SequenceEncoder(seq(max_len=4, sep=";"), CategoricalEncoder(seq()))
    enc.fit(pd.Series(["a;b"]))
    assert enc.encode(pd.Series(["a;b", "b"])).tolist() == [[0, 0, 1, 2], [0, 0, 0, 2]]


def test_sequence_shared_with_a_categorical_feature_uses_its_vocabulary():
    cfg = make_cfg(
        [
            {"name": "item", "kind": "categorical"},
            {"name": "history", "kind": "sequence", "share_with": "item", "max_len": 3},
        ]
    )
    df = pd.DataFrame({"item": ["i1", "i2", "i2"], "history": ["i9|i9|i9", "i1", "i2|i1"], "click": [0, 1, 0]})
    fz = Featurizer(cfg, build_graph(cfg)).fit(df)
    assert fz.cat["item"].vocab == ["i2", "i1"]  # history items do not enter the vocabulary
    table = fz.encode(df, "train")
    assert table.seq["history"].tolist() == [[0, 0, 0], [0, 0, 2], [0, 1, 2]]
    assert fz.layout().tables == (TableLayout("item", 3, 8),)  # one table for both features


SHARED = [{"name": "item", "kind": "categorical"}, {"name": "shop", "kind": "categorical", "share_with": "item"}]


def test_a_categorical_shared_with_another_is_encoded_with_its_vocabulary():
    cfg = make_cfg(SHARED)
    df = pd.DataFrame({"item": ["a", "b", "a"], "shop": ["b", "s1", "s2"], "click": [0, 1, 0]})
    fz = Featurizer(cfg, build_graph(cfg)).fit(df)
    table = fz.encode(df, "train")
    assert table.cat[:, 1].tolist() == [2, 0, 0]  # item's id of "b"; values item never saw are unknown
    assert fz.layout().tables == (TableLayout("item", 3, 8),)  # so every id is a row of item's table
    assert fz.cat["shop"].cardinality == 3 and fz.encoders["shop"].state() == {}


def test_encoders_json_that_holds_a_shared_features_own_vocabulary_keeps_encoding_with_it(tmp_path, caplog):
    """Written before shared vocabularies: the run was trained on those ids, so they stay."""
    cfg = make_cfg(SHARED)
    df = pd.DataFrame({"item": ["a", "b", "a"], "shop": ["b", "s1", "b"], "click": [0, 1, 0]})
    fz = Featurizer(cfg, build_graph(cfg)).fit(df)
    fz.save(tmp_path / "encoders.json")
    state = json.loads((tmp_path / "encoders.json").read_text())
    state["features"][1]["state"] = {"vocab": ["s1", "b"], "int_vocab": False}  # what fit wrote then
    (tmp_path / "encoders.json").write_text(json.dumps(state))
    with caplog.at_level(logging.WARNING):
        loaded = Featurizer.load(tmp_path / "encoders.json", cfg, fz.graph)
    assert "its own vocabulary" in caplog.text
    assert loaded.encode(df, "x").cat[:, 1].tolist() == [2, 1, 2]
    loaded.save(tmp_path / "again.json")  # and it is saved again as it was
    assert json.loads((tmp_path / "again.json").read_text())["features"][1]["state"]["vocab"] == ["s1", "b"]


# ---- featurizer -------------------------------------------------------------------------------------------

STAGES = [{"name": "click"}, {"name": "conversion", "after": "click"}]


def make_cfg(features, stages=None, **data):
    stages = stages or [{"name": "click"}]
    return config_from_dict({"data": {"train": "t.csv", **data}, "features": features, "funnel": {"stages": stages}})


def test_featurizer_save_and_load_give_identical_encodings(tmp_path):
    cfg = make_cfg(
        [
            {"name": "user", "kind": "categorical", "min_count": 2},
            {"name": "item", "kind": "categorical", "hash_buckets": 5},
            {"name": "price", "kind": "numeric", "transform": "log1p"},
            {"name": "age", "kind": "numeric"},
            {"name": "hist", "kind": "sequence", "max_len": 3},
        ],
        STAGES,
    )
    graph = build_graph(cfg)
    rng = np.random.default_rng(0)
    n = 50
    df = pd.DataFrame(
        {
            "user": rng.choice(["u1", "u2", "u3", "u4"], n),
            "item": rng.choice([f"i{k}" for k in range(10)], n),
            "price": rng.uniform(0, 100, n),
            "age": np.where(rng.random(n) < 0.2, np.nan, rng.normal(40, 10, n)),
            "hist": ["|".join(rng.choice(["a", "b", "c", "d"], rng.integers(0, 5))) for _ in range(n)],
            "click": rng.integers(0, 2, n),
        }
    )
    df["conversion"] = df["click"] * rng.integers(0, 2, n)
    fitted = Featurizer(cfg, graph).fit(df)
    fitted.save(tmp_path / "encoders.json")
    loaded = Featurizer.load(tmp_path / "encoders.json", cfg, graph)
    assert loaded.fitted
    assert loaded.layout() == fitted.layout()
    a, b = fitted.encode(df, "x"), loaded.encode(df, "x")
    for key, tensor in a.tensors().items():
        assert torch.equal(tensor, b.tensors()[key]), key
    assert a.num.shape == (n, 3)  # price, age, age's missing flag


def test_featurizer_names_every_missing_column():
    cfg = make_cfg([{"name": "user_id", "kind": "categorical"}, {"name": "price", "kind": "numeric"}])
    df = pd.DataFrame({"userid": ["a"], "click": [1]})
    with pytest.raises(DataError) as err:
        Featurizer(cfg, build_graph(cfg)).fit(df)
    assert len(err.value.problems) == 2
    assert "train: column 'user_id' is missing. Did you mean \"userid\"?" in str(err.value)
    assert "column 'price' is missing" in str(err.value)


def test_encode_without_labels_does_not_need_label_columns():
    cfg = make_cfg([{"name": "u", "kind": "categorical"}])
    fz = Featurizer(cfg, build_graph(cfg)).fit(pd.DataFrame({"u": ["a"], "click": [1]}))
    table = fz.encode(pd.DataFrame({"u": ["a", "b"]}), "predict", labels=False)
    assert table.labels is None and table.cat[:, 0].tolist() == [1, 0]


# ---- labels ------------------------------------------------------------------------------------------------


def test_positive_values_mark_label_one():
    stage = StageSpec(name="income", label="income_50k", positive=("50000+.",))
    col = pd.Series(["- 50000.", "50000+.", " 50000+. ", "other"])
    assert encode_label(col, stage).tolist() == [0.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize(
    "col",
    [
        pd.Series([1, 0, 1]),
        pd.Series([1.0, 0.0, 1.0]),
        pd.Series(["1", "0", " 1 "]),
        pd.Series(["1.0", "0.0", "1"]),
        pd.Series([1, "0", "1.0"], dtype=object),
        pd.Series([True, False, True]),
    ],
)
def test_numeric_positive_values_match_numerically(col):
    stage = StageSpec(name="click", positive=("1",))  # `positive: [1]` in the YAML
    assert encode_label(col, stage).tolist() == [1.0, 0.0, 1.0]


def test_numeric_and_text_positive_values_mix():
    stage = StageSpec(name="reply", positive=("1", "yes", "2.5"))
    col = pd.Series(["yes", "1.0", "no", " yes ", "2.50", "0", "1.5", "Yes"])
    assert encode_label(col, stage).tolist() == [1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0]


def test_non_finite_positive_values_compare_as_text():
    stage = StageSpec(name="x", positive=("inf",))
    assert encode_label(pd.Series(["inf", "1e400", "Infinity"]), stage).tolist() == [1.0, 0.0, 0.0]


def test_featurizer_reads_a_float_written_label_with_an_integer_positive():
    cfg = make_cfg([{"name": "u", "kind": "categorical"}], [{"name": "click", "positive": [1]}])
    df = pd.DataFrame({"u": ["a", "b", "c"], "click": [1.0, 0.0, 1.0]})
    table = Featurizer(cfg, build_graph(cfg)).fit(df).encode(df, "train")
    assert table.labels[:, 0].tolist() == [1.0, 0.0, 1.0]


def test_numeric_zero_one_and_boolean_labels_are_accepted():
    stage = StageSpec(name="click")
    assert encode_label(pd.Series([0, 1, 1]), stage).tolist() == [0.0, 1.0, 1.0]
    assert encode_label(pd.Series([0.0, 1.0]), stage).tolist() == [0.0, 1.0]
    assert encode_label(pd.Series([True, False]), stage).tolist() == [1.0, 0.0]


def test_label_other_than_zero_one_suggests_positive():
    stage = StageSpec(name="conversion", label="bought")
    with pytest.raises(DataError) as err:
        encode_label(pd.Series([0, 1, 2, "yes"]), stage)
    msg = str(err.value)
    assert "label column 'bought' (stage 'conversion')" in msg and "'2'" in msg and "'yes'" in msg
    assert "positive: [...]" in msg


def test_missing_label_values_are_a_data_error():
    with pytest.raises(DataError, match="has 1 missing values"):
        encode_label(pd.Series([0.0, np.nan]), StageSpec(name="click"))


CONFLICT = pd.DataFrame({"u": ["a", "b", "c", "d"], "click": [1, 0, 0, 1], "conversion": [1, 1, 0, 0]})
CONFLICT_Y = CONFLICT[["click", "conversion"]].to_numpy(np.float32)


def two_stage_graph() -> FunnelGraph:
    return FunnelGraph.chain([("click", "click", None), ("conversion", "conversion", "click")])


def test_conflict_counts_per_child_stage():
    assert conflict_counts(CONFLICT_Y, two_stage_graph()) == {"conversion": 1}


def test_conflict_policy_drop_removes_the_rows():
    labels, keep = resolve_conflicts(CONFLICT_Y, two_stage_graph(), "drop", "train")
    assert keep.tolist() == [True, False, True, True]
    np.testing.assert_array_equal(labels, CONFLICT_Y)


def test_drop_warns_when_it_removes_a_large_share_of_the_rows(caplog):
    """Two independent labels chained with `after` (never married after income) lose most rows to
    drop without a word under -q; more than 5% dropped is a warning that names `zero`."""
    y = np.array([[1, 1]] * 90 + [[0, 1]] * 10, dtype=np.float32)  # 10% conflicts
    with caplog.at_level(logging.WARNING, logger="funnel.data.labels"):
        resolve_conflicts(y, two_stage_graph(), "drop", "train")
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "removed 10 of 100 rows (10%" in record.getMessage()
    assert "data.label_conflicts: zero" in record.getMessage()
    caplog.clear()
    few = np.array([[1, 1]] * 96 + [[0, 1]] * 4, dtype=np.float32)  # 4%: the info line only
    with caplog.at_level(logging.WARNING, logger="funnel.data.labels"):
        resolve_conflicts(few, two_stage_graph(), "drop", "train")
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_conflict_policy_zero_clears_the_child_label():
    labels, keep = resolve_conflicts(CONFLICT_Y, two_stage_graph(), "zero", "train")
    assert keep.all()
    assert labels.tolist() == [[1, 1], [0, 0], [0, 0], [1, 0]]
    assert CONFLICT_Y[1, 1] == 1  # the input is not modified


def test_conflict_policy_error_counts_the_conflicts():
    with pytest.raises(DataError) as err:
        resolve_conflicts(CONFLICT_Y, two_stage_graph(), "error", "train")
    msg = str(err.value)
    assert msg.startswith("train: 1 label conflicts") and "conversion: 1" in msg
    assert "data.label_conflicts" in msg


def test_zero_policy_cascades_down_a_chain():
    graph = FunnelGraph.chain([("a", "a", None), ("b", "b", "a"), ("c", "c", "b")])
    y = np.array([[0, 1, 1], [1, 0, 1], [1, 1, 1]], dtype=np.float32)
    zeroed, _ = resolve_conflicts(y, graph, "zero", "t")
    assert zeroed.tolist() == [[0, 0, 0], [1, 0, 0], [1, 1, 1]]
    _, keep = resolve_conflicts(y, graph, "drop", "t")
    assert keep.tolist() == [False, False, True]


@pytest.mark.parametrize(
    ("policy", "rows", "conversion"),
    [("drop", [0, 2, 3], [1, 0, 0]), ("zero", [0, 1, 2, 3], [1, 0, 0, 0])],
)
def test_featurizer_applies_the_conflict_policy(policy, rows, conversion):
    cfg = make_cfg([{"name": "u", "kind": "categorical"}], STAGES, label_conflicts=policy)
    fz = Featurizer(cfg, build_graph(cfg)).fit(CONFLICT)
    table = fz.encode(CONFLICT, "train")
    assert len(table) == len(rows)
    assert table.rows.tolist() == rows
    assert table.labels[:, 1].tolist() == conversion
    assert table.cat[:, 0].tolist() == [fz.cat["u"].vocab.index(v) + 1 for v in CONFLICT["u"].iloc[rows]]


def test_featurizer_refuses_conflicts_under_error():
    cfg = make_cfg([{"name": "u", "kind": "categorical"}], STAGES, label_conflicts="error")
    fz = Featurizer(cfg, build_graph(cfg)).fit(CONFLICT)
    with pytest.raises(DataError, match="valid: 1 label conflicts"):
        fz.encode(CONFLICT, "valid")


def test_integer_fast_path_gives_the_ids_of_the_string_path():
    from funnel.data.encoders import CategoricalEncoder
    from funnel.spec.schema import FeatureSpec

    spec = FeatureSpec(name="x", kind="categorical")
    ints = pd.Series([5, 7, 7, 12, 5, 7, 3])
    fast = CategoricalEncoder(spec).fit(ints)
    slow = CategoricalEncoder(spec).fit(ints.astype(str))
    assert fast.vocab == slow.vocab == ["7", "5", "12", "3"]  # by frequency, ties by value as text
    probe = pd.Series([12, 3, 99, 7])
    for col in (probe, probe.astype(float), probe.astype(str)):
        assert fast.encode(col).tolist() == slow.encode(col).tolist() == [3, 4, 0, 1]
    with_nan = pd.Series([12.0, None, 7.0])
    assert fast.encode(with_nan).tolist() == [3, 0, 1]  # missing is the unknown id
    odd = CategoricalEncoder(spec).fit(pd.Series(["012", "12", "a"]))
    assert odd.encode(pd.Series([12])).tolist() == [odd.vocab.index("12") + 1]  # "012" is not 12
    # an integer column's vocabulary is known to be canonical, and says so in its saved state
    assert fast.int_vocab and not slow.int_vocab and not odd.int_vocab
    assert fast.state() == {"vocab": ["7", "5", "12", "3"], "int_vocab": True}
    restored = CategoricalEncoder(spec, **fast.state())
    assert restored.encode(probe).tolist() == [3, 4, 0, 1]
    legacy = CategoricalEncoder(spec, vocab=fast.vocab)  # saved before int_vocab existed: checked instead
    assert legacy.encode(probe).tolist() == [3, 4, 0, 1]


# ---- streaming fit: observe chunk by chunk, then finalize -------------------------------------------------------


def chunked(encoder, chunks):
    for chunk in chunks:
        encoder.observe(chunk)
    return encoder.finalize()


def split(col: pd.Series, sizes: list[int]) -> list[pd.Series]:
    bounds = np.cumsum([0, *sizes])
    return [col.iloc[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


@pytest.mark.parametrize(
    "chunks",
    [
        [pd.Series([5, 7, 7]), pd.Series([12, 5, 7]), pd.Series([3])],  # integer-coded
        [pd.Series([5.0, 7.0, 7.0]), pd.Series([12, 5, 7]), pd.Series([3.0, np.nan])],  # float-integral, missing
        [pd.Series(["b", "a"]), pd.Series(["a", None, "c"])],  # strings, missing
        [pd.Series([5, 7, 7]), pd.Series(["7", "x", "5"]), pd.Series([12.0, 5.0])],  # mixed: tokens are strings
        [pd.Series([1.5, 2.0]), pd.Series([2.0, 3.0])],  # a float with a fraction: 2.0 is "2" in both chunks
    ],
    ids=["int", "float_integral", "string", "mixed", "fraction"],
)
@pytest.mark.parametrize("min_count", [1, 2])
def test_a_chunked_categorical_fit_equals_one_fit_of_the_concatenation(chunks, min_count):
    spec = cat(min_count=min_count)
    whole = CategoricalEncoder(spec).fit(pd.concat(chunks, ignore_index=True))
    streamed = chunked(CategoricalEncoder(spec), chunks)
    assert streamed.state() == whole.state()
    probe = pd.concat(chunks, ignore_index=True)
    np.testing.assert_array_equal(streamed.encode(probe), whole.encode(probe))


def test_counts_are_merged_across_chunks_before_min_count_and_ties_keep_their_order():
    chunks = [pd.Series([1, 2, 3]), pd.Series([3, 4]), pd.Series([2, 10])]  # 1, 4, 10 once; 2, 3 twice
    assert chunked(CategoricalEncoder(cat(min_count=2)), chunks).vocab == ["2", "3"]
    assert chunked(CategoricalEncoder(cat()), chunks).vocab == ["2", "3", "1", "10", "4"]  # ties by text
    assert chunked(CategoricalEncoder(cat()), chunks).int_vocab
    with_text = [*chunks, pd.Series(["4"])]  # one chunk of strings: a vocabulary of strings, 4 now counted twice
    enc = chunked(CategoricalEncoder(cat()), with_text)
    assert enc.vocab == ["2", "3", "4", "1", "10"] and not enc.int_vocab


def test_pending_counts_are_merged_when_they_grow(monkeypatch):
    import funnel.data.streaming as streaming

    monkeypatch.setattr(streaming, "MERGE_AT", 5)
    rng = np.random.default_rng(0)
    chunks = [pd.Series(rng.integers(0, 20, 50)) for _ in range(30)] + [pd.Series(rng.choice(list("abc"), 9))]
    enc = CategoricalEncoder(cat(min_count=3))
    for chunk in chunks:
        enc.observe(chunk)
        assert len(enc._counts.ints) <= 3  # merged: memory in the distinct values, not the chunks
    enc.finalize()
    whole = CategoricalEncoder(cat(min_count=3)).fit(pd.concat(chunks, ignore_index=True))
    assert enc.state() == whole.state()
    assert enc._counts.ints == [] and enc._counts.strings == []  # finalize starts afresh


def test_a_hashed_feature_observes_nothing():
    enc = chunked(CategoricalEncoder(cat(hash_buckets=5)), [pd.Series(["a"]), pd.Series(["b"])])
    assert enc.vocab == [] and enc.cardinality == 6 and enc._counts.ints == enc._counts.strings == []


@pytest.mark.parametrize("transform", ["standardize", "log1p", "none"])
def test_a_chunked_numeric_fit_equals_np_mean_and_np_std_of_the_whole_column(transform):
    rng = np.random.default_rng(1)
    values = rng.lognormal(3, 1, 10_000)
    values[rng.random(10_000) < 0.05] = np.nan
    values[[7, 9_000]] = np.inf
    col = pd.Series(values)
    whole = NumericEncoder(num(transform=transform)).fit(col)
    streamed = chunked(NumericEncoder(num(transform=transform)), split(col, [1, 999, 4_000, 3_333, 1_667]))
    x = values[np.isfinite(values)]
    x = np.log1p(x) if transform == "log1p" else x
    for enc in (whole, streamed):
        assert enc.mean == pytest.approx(np.mean(x), rel=1e-12) and enc.std == pytest.approx(np.std(x), rel=1e-12)
        assert enc.flag
    assert whole.mean == float(np.mean(x)) and whole.std == float(np.std(x))  # one chunk: numpy's numbers exactly


def test_a_numeric_chunk_without_present_values_changes_nothing(caplog):
    chunks = [pd.Series([np.nan, np.nan]), pd.Series([1.0, 3.0]), pd.Series([], dtype=float)]
    with caplog.at_level(logging.INFO, logger="funnel.data.encoders"):
        enc = chunked(NumericEncoder(num()), chunks)
    assert (enc.mean, enc.std, enc.flag) == (2.0, 1.0, True)
    [record] = caplog.records  # one summary for the whole split, not one per chunk
    assert "2 missing and 0 non-finite" in record.getMessage()


def test_chunked_sequence_and_multi_hot_fits_equal_one_fit():
    from funnel.data.list_encoders import MultiHotEncoder

    col = pd.Series(["3|1|2", "5", "", None, "2|9|9", "1"])
    for spec, make in ((seq(max_len=2), SequenceEncoder), (FeatureSpec(name="x", kind="multi_hot"), MultiHotEncoder)):
        whole = make(spec, CategoricalEncoder(spec)).fit(col)
        streamed = chunked(make(spec, CategoricalEncoder(spec)), split(col, [2, 3, 1]))
        assert streamed.state() == whole.state() and whole.ids.vocab == ["1", "2", "9", "3", "5"]


# ---- tokens ---------------------------------------------------------------------------------------------------


def test_every_float_is_its_own_token_whatever_the_rest_of_its_column():
    from funnel.data.encoders import as_tokens

    tokens = as_tokens(pd.Series([2.0, 1.5, np.nan, np.inf, -0.0, 1e20]))
    assert tokens.tolist() == ["2", "1.5", "<NA>", "inf", "0", "1e+20"]
    assert as_tokens(pd.Series([2.0, "a", 7], dtype=object)).tolist() == ["2", "a", "7"]
    enc = CategoricalEncoder(cat()).fit(pd.Series([2.0, 1.5, 2.0]))
    assert enc.vocab == ["2", "1.5"]
    assert enc.encode(pd.Series([2.0, 3.0])).tolist() == enc.encode(pd.Series([2.0, 1.5])).tolist()[:1] + [0]


def test_a_vocabulary_that_spelt_whole_floats_as_floats_still_finds_them():
    """encoders.json written before each float was spelt on its own: "2.0" from a column with 1.5 in it."""
    enc = CategoricalEncoder(cat(), vocab=["2.0", "1.5", "7"])
    assert enc.encode(pd.Series([2.0, 1.5, 7.0, 9.0])).tolist() == [1, 2, 3, 0]
    assert enc.encode(pd.Series([2.0, 7.0])).tolist() == [1, 3]  # an integral column: "2", then "2.0"
