"""Multi-hot features: id lists in every input shape, weights, length caps that are counted, and
their pooled embeddings (sum, mean, weighted) against hand-computed vectors, dense and sparse."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from funnel.data.encoders import CategoricalEncoder
from funnel.data.featurizer import Featurizer
from funnel.data.layout import FeatureLayout, FieldLayout, TableLayout
from funnel.data.list_encoders import MultiHotEncoder, SequenceEncoder
from funnel.data.lists import read_lists
from funnel.data.table import BAG, CAT, NUM, Ragged, bag_key, bag_offsets_key, bag_tensors, bag_weights_key, take
from funnel.errors import ConfigError, DataError
from funnel.models.embedding import SharedEmbeddings
from funnel.runs import build_graph
from funnel.spec import config_from_dict
from funnel.spec.schema import FeatureSpec


def mh(**kw) -> FeatureSpec:
    return FeatureSpec(name=kw.pop("name", "tags"), kind="multi_hot", **kw)


def encoder(spec: FeatureSpec | None = None, fit: pd.Series | None = None) -> MultiHotEncoder:
    spec = spec or mh()
    enc = MultiHotEncoder(spec, CategoricalEncoder(spec))
    return enc if fit is None else enc.fit(fit)


def int_lists(rows: list) -> pd.Series:
    return pd.Series(rows, dtype=pd.ArrowDtype(pa.list_(pa.int64())))


# ---- reading the lists ----------------------------------------------------------------------------------------
# the same four rows in every shape: [12, 7], missing, empty, [7, 99]
SHAPES = {
    "arrow": int_lists([[12, 7], None, [], [7, 99]]),
    "arrow_large_list": pd.Series([[12, 7], None, [], [7, 99]], dtype=pd.ArrowDtype(pa.large_list(pa.int32()))),
    "arrow_strings": pd.Series(
        [["12", "7"], None, [], ["7", "99"]], dtype=pd.ArrowDtype(pa.list_(pa.dictionary(pa.int8(), pa.string())))
    ),
    "strings": pd.Series(["12|7", None, "", "7|99"]),
    "objects": pd.Series([[12, 7], None, np.array([], dtype=np.int64), (7, 99)], dtype=object),
    "float_objects": pd.Series([[12.0, 7.0], np.nan, [], np.array([7.0, 99.0])], dtype=object),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_input_shape_gives_the_same_ids_and_offsets(shape):
    enc = encoder(fit=pd.Series(["7|7|12", "99"]))
    assert enc.ids.vocab == ["7", "12", "99"]  # by frequency, ties by value
    out = enc.encode(SHAPES[shape], "train")
    assert isinstance(out, Ragged) and out.weights is None
    assert out.values.dtype == out.offsets.dtype == torch.int64
    assert out.offsets.tolist() == [0, 2, 2, 2, 4] and out.values.tolist() == [2, 1, 1, 3]


def test_strings_split_without_pyarrow_give_the_same_lists(monkeypatch):
    expected = read_lists(SHAPES["strings"], "|")
    monkeypatch.setattr("funnel.data.lists.pyarrow_or_none", lambda: None)  # as if pyarrow were not installed
    got = read_lists(SHAPES["strings"], "|")
    assert got.offsets.tolist() == expected.offsets.tolist() == [0, 2, 2, 2, 4]
    assert got.values.tolist() == expected.values.tolist() == ["12", "7", "7", "99"]


def test_missing_and_empty_items_are_no_items_and_a_numeric_column_is_one_id_per_cell():
    enc = encoder(fit=pd.Series(["a|b"]))
    out = enc.encode(pd.Series(["a||b", "|", "b|"]))
    assert out.offsets.tolist() == [0, 2, 2, 3] and out.values.tolist() == [1, 2, 2]
    nulls = encoder(fit=int_lists([[5, 6]])).encode(int_lists([[5, None, 6], [None]]))
    assert nulls.offsets.tolist() == [0, 2, 2] and nulls.values.tolist() == [1, 2]
    single = encoder(fit=pd.Series([5, 6, 6])).encode(pd.Series([6.0, np.nan, 5.0]))  # read from CSV: one id each
    assert single.offsets.tolist() == [0, 1, 1, 2] and single.values.tolist() == [1, 2]


def test_a_sliced_or_chunked_arrow_column_is_read_from_its_own_rows():
    col = int_lists([[1], [2, 3], [4, 5, 6]]).iloc[1:]
    lists = read_lists(col, "|")
    assert lists.offsets.tolist() == [0, 2, 5] and lists.values.tolist() == [2, 3, 4, 5, 6]
    chunks = pd.concat([int_lists([[1], [2, 3]]), int_lists([None, [4]])], ignore_index=True)  # two Arrow chunks
    lists = read_lists(chunks, "|")
    assert lists.offsets.tolist() == [0, 1, 3, 3, 4] and lists.values.tolist() == [1, 2, 3, 4]


def test_ids_are_tokenised_like_categories_min_count_and_hashing_too():
    enc = encoder(mh(min_count=2), fit=int_lists([[3, 4], [3], [5, 4, 4]]))
    assert enc.ids.vocab == ["4", "3"] and enc.cardinality == 3  # 5 is seen once: the unknown id 0
    assert enc.encode(pd.Series(["3|5|4|x"])).values.tolist() == [2, 0, 1, 0]
    hashed = encoder(mh(hash_buckets=7), fit=pd.Series(["a|b"]))
    assert hashed.cardinality == 8 and hashed.ids.vocab == []
    cat = CategoricalEncoder(FeatureSpec(name="c", kind="categorical", hash_buckets=7))
    ids = hashed.encode(int_lists([[12, 13]])).values.numpy()
    np.testing.assert_array_equal(ids, cat.encode(pd.Series([12, 13])))  # same buckets as the category


# ---- weights ----------------------------------------------------------------------------------------------------


def test_weights_are_parallel_lists_kept_with_their_ids():
    enc = encoder(mh(weights="w"), fit=pd.Series(["7|7|12", "99"]))
    out = enc.encode(SHAPES["arrow"], "train", weights=pd.Series(["0.5|2", None, "", "1|4"]))
    assert out.weights.dtype == torch.float32 and out.weights.tolist() == [0.5, 2.0, 1.0, 4.0]
    arrow = pd.Series([[0.5, 2.0], None, [], [1.0, 4.0]], dtype=pd.ArrowDtype(pa.list_(pa.float32())))
    assert enc.encode(SHAPES["strings"], "train", weights=arrow).weights.tolist() == [0.5, 2.0, 1.0, 4.0]
    # a missing id drops its weight with it
    dropped = enc.encode(pd.Series(["12||7"]), "train", weights=pd.Series(["1|2|3"]))
    assert dropped.values.tolist() == [2, 1] and dropped.weights.tolist() == [1.0, 3.0]


def test_weights_of_other_lengths_name_the_column_and_the_first_bad_row():
    enc = encoder(mh(name="f", column="ids", weights="w"), fit=pd.Series(["1|2"]))
    weights = pd.Series(["1|2", "1", "", "3"], index=[10, 11, 12, 13])
    with pytest.raises(DataError) as err:
        enc.encode(pd.Series(["1|2", "1", "2", "1|2"], index=[10, 11, 12, 13]), "valid", weights=weights)
    msg = str(err.value)
    assert "valid: column 'w' (weights of multi-hot feature 'f'): row 12 has 0 weights for 1 ids" in msg
    assert "column 'ids'" in msg and "(2 rows differ)" in msg and "one weight per id" in msg


@pytest.mark.parametrize(
    ("weights", "found"), [("1|x", "the weight 'x'"), ("1|inf", "the weight 'inf'"), ("1|", "a missing")]
)
def test_a_weight_that_is_not_a_finite_number_is_a_data_error(weights, found):
    enc = encoder(mh(weights="w"), fit=pd.Series(["1|2"]))
    with pytest.raises(DataError, match=f"column 'w' .*: row 1 has {found}"):
        enc.encode(pd.Series(["1", "1|2"]), "train", weights=pd.Series(["1", weights]))


def test_a_weighted_feature_without_its_weight_column_is_a_data_error():
    enc = encoder(mh(weights="w"), fit=pd.Series(["1"]))
    with pytest.raises(DataError, match="takes weights from column 'w', which was not read"):
        enc.encode(pd.Series(["1"]), "train")


# ---- no silent truncation ---------------------------------------------------------------------------------------


def test_max_len_keeps_the_last_ids_and_counts_what_it_cut(caplog):
    enc = encoder(mh(max_len=2, weights="w"), fit=pd.Series(["1|2|3|4"]))  # vocabulary: 1, 2, 3, 4 -> ids 1..4
    with caplog.at_level(logging.WARNING, logger="funnel.data.encoders"):
        out = enc.encode(pd.Series(["1|2|3", "4", "1|2|3|4"]), "train", weights=pd.Series(["1|2|3", "4", "5|6|7|8"]))
    assert out.offsets.tolist() == [0, 2, 3, 5] and out.values.tolist() == [2, 3, 4, 3, 4]
    assert out.weights.tolist() == [2.0, 3.0, 4.0, 7.0, 8.0]  # the weights of the ids kept
    assert enc.truncation == {"train": (2, 3)}
    [record] = caplog.records
    assert record.getMessage().startswith("train: feature 'tags' (column 'tags'): 2 rows longer than max_len 2")
    assert "3 ids dropped" in record.getMessage()
    enc.encode(pd.Series(["1|2|3"]), "train", weights=pd.Series(["1|1|1"]))  # another chunk of the split
    enc.encode(pd.Series(["1|2|3"]), "valid", weights=pd.Series(["1|1|1"]))
    assert enc.truncation == {"train": (3, 4), "valid": (1, 1)}


def test_without_max_len_a_multi_hot_feature_keeps_every_id(caplog):
    enc = encoder(fit=pd.Series(["1"]))
    with caplog.at_level(logging.WARNING):
        out = enc.encode(pd.Series(["|".join(["1"] * 342)]), "train")
    assert out.offsets.tolist() == [0, 342] and enc.truncation == {} and caplog.records == []


def test_a_sequence_counts_and_logs_the_ids_its_max_len_drops(caplog):
    spec = FeatureSpec(name="hist", kind="sequence")
    assert spec.max_len == 20  # the default it pads to
    enc = SequenceEncoder(spec, CategoricalEncoder(spec)).fit(pd.Series(["1|2"]))
    with caplog.at_level(logging.WARNING, logger="funnel.data.encoders"):
        out = enc.encode(pd.Series(["|".join(["1"] * 341 + ["2"]), "1|2"]), "train")
    assert out.shape == (2, 20) and out[0, -1] == 2 and out[1].tolist() == [0] * 18 + [1, 2]
    assert enc.truncation == {"train": (1, 322)}
    assert "1 rows longer than max_len 20, 322 ids dropped" in caplog.text


def test_check_reports_the_truncated_rows_and_ids_per_split(tmp_path, write_config):
    rng = np.random.default_rng(0)
    n = 200
    ids = [[int(v) for v in rng.integers(0, 30, rng.integers(0, 5))] for _ in range(n)]
    ids[3] = list(range(342))  # Ali-CCP's field 110_14 has 342 ids in one row
    frame = pd.DataFrame(
        {
            "tags": ["|".join(map(str, row)) for row in ids],
            "hist": ["|".join(map(str, row)) for row in ids],
            "u": rng.integers(0, 5, n),
            "click": np.r_[[0, 1] * (n // 2)],
        }
    )
    for split in ("train", "valid"):
        frame.to_csv(tmp_path / f"{split}.csv", index=False)
    cfg = write_config(
        {
            "data": {"train": str(tmp_path / "train.csv"), "valid": str(tmp_path / "valid.csv"), "cache": False},
            "features": [
                {"name": "u", "kind": "categorical"},
                {"name": "tags", "kind": "multi_hot", "max_len": 20},
                {"name": "hist", "kind": "sequence", "max_len": 20},
            ],
            "funnel": {"stages": [{"name": "click"}]},
        }
    )
    from funnel.check import check

    report = check(str(cfg))
    assert report["truncated"]["train"] == {"tags": {"rows": 1, "ids": 322}, "hist": {"rows": 1, "ids": 322}}
    assert report["truncated"]["valid"] == report["truncated"]["train"]
    assert report["features"]["tags"] == 343  # ids 0 to 341 and the unknown id 0


# ---- config ------------------------------------------------------------------------------------------------------


def make_cfg(features, **data):
    return config_from_dict(
        {"data": {"train": "t.csv", **data}, "features": features, "funnel": {"stages": [{"name": "click"}]}}
    )


def test_a_multi_hot_feature_takes_its_options_and_defaults_to_no_cap():
    cfg = make_cfg(
        [
            {"name": "item", "kind": "categorical"},
            {"name": "tags", "kind": "multi_hot", "weights": "tag_w", "pooling": "sum", "share_with": "item"},
            {"name": "hist", "kind": "sequence"},
        ]
    )
    tags, hist = cfg.features[1], cfg.features[2]
    assert (tags.max_len, tags.weights, tags.pooling, tags.sep) == (None, "tag_w", "sum", "|")
    assert hist.max_len == 20 and hist.weights is None


@pytest.mark.parametrize(
    ("features", "message"),
    [
        ([{"name": "a", "kind": "numeric"}, {"name": "b", "kind": "multi_hot", "share_with": "a"}], "not another"),
        ([{"name": "a", "kind": "categorical", "weights": "w"}], "a categorical feature does not take `weights`"),
        ([{"name": "a", "kind": "multi_hot", "weights": "click"}], "'click' is a stage label"),
        ([{"name": "a", "kind": "multi_hot", "weights": "a"}], "the column of the ids themselves"),
        ([{"name": "a", "kind": "multi_hot", "max_len": 0}], "max_len must be >= 1"),
        ([{"name": "a", "kind": "multi_hot", "pooling": "max"}], "is not one of mean, sum"),
        ([{"name": "a", "kind": "sequence", "max_len": None}], "a sequence is padded to max_len"),
        (
            [
                {"name": "a", "kind": "multi_hot"},
                {"name": "b", "kind": "multi_hot", "share_with": "a"},
                {"name": "c", "kind": "categorical", "share_with": "b"},
            ],
            "'b' itself shares 'a'",
        ),
    ],
)
def test_bad_multi_hot_options_are_config_errors(features, message):
    with pytest.raises(ConfigError, match=message):
        make_cfg(features)


def test_a_multi_hot_feature_may_share_a_table_with_a_categorical_and_the_ids_agree():
    cfg = make_cfg(
        [{"name": "item", "kind": "categorical"}, {"name": "clicked", "kind": "multi_hot", "share_with": "item"}]
    )
    df = pd.DataFrame({"item": [12, 7, 7, 99], "clicked": ["12|99", "", "7|5", "7"], "click": [1, 0, 0, 1]})
    fz = Featurizer(cfg, build_graph(cfg)).fit(df)
    assert fz.cat["item"].vocab == ["7", "12", "99"]  # the list ids do not enter the vocabulary
    table = fz.encode(df, "train")
    bag = table.bags["clicked"]
    assert bag.values.tolist() == [2, 3, 1, 0, 1] and bag.offsets.tolist() == [0, 2, 2, 4, 5]  # 5: unknown
    assert fz.layout().tables == (TableLayout("item", 4, 8),)
    assert fz.layout().field("clicked") == FieldLayout("clicked", "multi_hot", BAG, "item", 8, pooling="mean")


def test_the_layout_lists_bag_fields_last_and_the_placeholder_knows_them():
    features = [
        {"name": "u", "kind": "categorical"},
        {"name": "tags", "kind": "multi_hot", "weights": "w", "pooling": "sum", "embed_dim": 3},
        {"name": "p", "kind": "numeric"},
        {"name": "h", "kind": "sequence", "share_with": "tags"},
    ]
    layout = FeatureLayout.placeholder(make_cfg(features))
    assert [(f.name, f.block) for f in layout.fields] == [("u", CAT), ("h", "seq"), ("tags", BAG)]
    assert layout.field("tags") == FieldLayout("tags", "multi_hot", BAG, "tags", 3, pooling="sum", weighted=True)
    assert layout.field("h").table == "tags" and layout.field("h").dim == 3
    assert layout.fields_in(BAG) == (layout.field("tags"),)


# ---- pooling ---------------------------------------------------------------------------------------------------

# two tables of width 2 (one fused weight) and one of width 3
LAYOUT = FeatureLayout(
    tables=(TableLayout("item", 4, 2), TableLayout("tags", 3, 2), TableLayout("cats", 3, 3)),
    fields=(
        FieldLayout("item", "categorical", CAT, "item", 2, column=0),
        FieldLayout("sum", "multi_hot", BAG, "tags", 2, pooling="sum"),
        FieldLayout("wsum", "multi_hot", BAG, "tags", 2, pooling="sum", weighted=True),
        FieldLayout("mean", "multi_hot", BAG, "item", 2, pooling="mean"),  # share_with: item
        FieldLayout("wmean", "multi_hot", BAG, "cats", 3, pooling="mean", weighted=True),
    ),
    numeric_dim=1,
)
ITEM = torch.tensor([[0.0, 0.0], [1.0, 2.0], [3.0, 5.0], [7.0, 11.0]])
TAGS = torch.tensor([[0.0, 0.0], [10.0, 20.0], [30.0, 50.0]])
CATS = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 2.0]])


def bags(ids: list[list[int]], weights: list[list[float]] | None = None) -> Ragged:
    offsets = torch.tensor(np.r_[0, np.cumsum([len(r) for r in ids])], dtype=torch.int64)
    values = torch.tensor([v for r in ids for v in r], dtype=torch.int64)
    w = None if weights is None else torch.tensor([v for r in weights for v in r], dtype=torch.float32)
    return Ragged(values, offsets, w)


def pooling_batch() -> dict[str, torch.Tensor]:
    batch = {CAT: torch.tensor([[1], [3], [0]]), NUM: torch.tensor([[0.5], [1.0], [2.0]])}
    batch.update(bag_tensors("sum", bags([[1, 2], [], [2, 2, 0]])))
    batch.update(bag_tensors("wsum", bags([[1, 2], [1], []], [[0.5, 2.0], [3.0], []])))
    batch.update(bag_tensors("mean", bags([[1, 3], [2], []])))
    batch.update(bag_tensors("wmean", bags([[1, 2], [2, 1], [1]], [[1.0, 3.0], [1.0, -1.0], [2.0]])))
    return batch


def embeddings(sparse: bool = False) -> SharedEmbeddings:
    emb = SharedEmbeddings(LAYOUT)
    with torch.no_grad():
        emb.table_weight("item").copy_(ITEM)
        emb.table_weight("tags").copy_(TAGS)
        emb.table_weight("cats").copy_(CATS)
    for table in emb.fused.values():
        table.sparse = sparse
    return emb


EXPECTED = {
    "sum": [[40.0, 70.0], [0.0, 0.0], [60.0, 100.0]],  # e1 + e2; nothing; e2 + e2 + e0
    "wsum": [[65.0, 110.0], [30.0, 60.0], [0.0, 0.0]],  # .5·e1 + 2·e2; 3·e1; nothing
    "mean": [[4.0, 6.5], [3.0, 5.0], [0.0, 0.0]],  # (e1 + e3) / 2; e2; an empty list: zero
    # (1·e1 + 3·e2) / 4; weights summing to 0: zero; 2·e1 / 2
    "wmean": [[0.25, 0.75, 1.5], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]],
}


def test_every_pooling_gives_the_hand_computed_vectors():
    x = embeddings()(pooling_batch())
    for name, expected in EXPECTED.items():
        torch.testing.assert_close(x.fields[name], torch.tensor(expected), rtol=0, atol=1e-6)
    order = [x.fields[n] for n in ("item", "sum", "wsum", "mean", "wmean")]
    torch.testing.assert_close(x.flat, torch.cat([*order, pooling_batch()[NUM]], 1))
    assert x.flat.shape == (3, embeddings().shape.flat_dim) == (3, 2 + 2 + 2 + 2 + 3 + 1)
    assert embeddings().shape.sequence_fields == ()  # a bag is a plain (B, E) field for the towers


def test_the_bags_of_one_width_are_pooled_in_one_embedding_bag_call(monkeypatch):
    import funnel.models.embedding as module

    calls = []
    real = module.F.embedding_bag
    monkeypatch.setattr(module.F, "embedding_bag", lambda *a, **kw: calls.append(a[1].shape) or real(*a, **kw))
    embeddings()(pooling_batch())
    assert sorted(calls) == [(3, 3), (7, 2)]  # one per fused weight: d2 holds item and tags, d3 cats


def test_gradients_of_the_pooled_fields_are_the_weights_and_sparse_gives_the_dense_ones():
    grads = {}
    for sparse in (False, True):
        emb = embeddings(sparse)
        x = emb(pooling_batch())
        sum(x.fields[n].sum() for n in EXPECTED).backward()
        grads[sparse] = {k: t.weight.grad for k, t in emb.fused.items()}
        assert all(g.is_sparse == sparse for g in grads[sparse].values())
    d2 = grads[False]["d2"]
    # rows 0-3: item (mean: 1/2 to e1 and e3, 1 to e2); rows 4-6: tags (sum: e1 once, e2 three times, e0 once;
    # wsum: .5 + 3 to e1, 2 to e2)
    expected = torch.tensor([0.0, 0.5, 1.0, 0.5, 1.0, 1.0 + 3.5, 3.0 + 2.0]).unsqueeze(1).expand(7, 2)
    torch.testing.assert_close(d2, expected)
    # wmean: row 0 gives 1/4 and 3/4, row 1 (total 0) nothing, row 2 gives 2/2
    torch.testing.assert_close(grads[False]["d3"][:, 0], torch.tensor([0.0, 0.25 + 1.0, 0.75]))
    for key in grads[False]:
        torch.testing.assert_close(grads[True][key].to_dense(), grads[False][key])


def test_an_empty_batch_of_lists_pools_to_zeros():
    batch = pooling_batch()
    for name in EXPECTED:  # every row empty
        batch.update(bag_tensors(name, bags([[], [], []], [[], [], []] if name.startswith("w") else None)))
    x = embeddings()(batch)
    for name in EXPECTED:
        assert not x.fields[name].any()


def test_encoded_lists_batch_and_train_end_to_end_through_the_embeddings():
    cfg = make_cfg(
        [
            {"name": "u", "kind": "categorical"},
            {"name": "tags", "kind": "multi_hot", "weights": "w", "pooling": "sum", "max_len": 3},
        ]
    )
    rng = np.random.default_rng(0)
    n = 40
    lengths = rng.integers(0, 6, n)
    df = pd.DataFrame(
        {
            "u": rng.integers(0, 4, n),
            "tags": int_lists([list(rng.integers(0, 9, k)) for k in lengths]),
            "w": pd.Series([list(rng.random(k)) for k in lengths], dtype=pd.ArrowDtype(pa.list_(pa.float64()))),
            "click": rng.integers(0, 2, n),
        }
    )
    fz = Featurizer(cfg, build_graph(cfg)).fit(df)
    table = fz.encode(df, "train")
    assert fz.encoders["tags"].truncation["train"] == (int((lengths > 3).sum()), int((lengths - 3).clip(0).sum()))
    rows = torch.tensor([5, 0, 17])
    batch = take(table.tensors(), rows)
    emb = SharedEmbeddings(fz.layout())
    out = emb(batch).fields["tags"]
    weight = emb.table_weight("tags").detach()
    for i, r in enumerate(rows.tolist()):  # row by row, from the table itself
        bag = table.bags["tags"].take(torch.tensor([r]))
        expected = (weight[bag.values] * bag.weights.unsqueeze(1)).sum(0)
        torch.testing.assert_close(out[i].detach(), expected)
    assert batch[bag_key("tags")].dtype == torch.int64 and bag_weights_key("tags") in batch
    assert batch[bag_offsets_key("tags")].shape == (4,)


# ---- funnel fit, end to end ------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse_embeddings"])
def test_funnel_fit_trains_and_predicts_with_a_weighted_multi_hot_feature(
    sparse, synth_dir, base_config, write_config, tmp_path
):
    """Needs the featurizer to hand multi-hot features their weight column (featurizer.py)."""
    from funnel.cli import main

    rng = np.random.default_rng(0)
    for split in ("train", "valid", "test"):
        df = pd.read_csv(synth_dir / f"{split}.csv")
        k = rng.integers(0, 4, len(df))
        # the item itself and a few other items: the list shares the item_id table
        df["clicked"] = [
            "|".join(map(str, [i, *rng.integers(0, 100, n)])) for i, n in zip(df["item_id"], k, strict=True)
        ]
        df["clicked_w"] = ["|".join(f"{w:.2f}" for w in rng.random(n + 1)) for n in k]
        df.to_csv(tmp_path / f"{split}.csv", index=False)
        base_config["data"][split] = str(tmp_path / f"{split}.csv")
    base_config["features"].append(
        {"name": "clicked", "kind": "multi_hot", "share_with": "item_id", "weights": "clicked_w", "pooling": "sum"}
    )
    base_config["optim"]["sparse_embeddings"] = sparse
    assert main(["fit", str(write_config(base_config))]) == 0
    run = tmp_path / "run"
    assert (run / "metrics.json").exists()
    out = tmp_path / "p.csv"
    assert main(["predict", str(run), "--data", str(tmp_path / "test.csv"), "--out", str(out)]) == 0
    assert len(pd.read_csv(out)) == 300


# ---- every tower -----------------------------------------------------------------------------------------------


def tower_names() -> list[str]:
    from funnel.models import TOWERS

    return TOWERS.names()


@pytest.mark.parametrize("name", tower_names())
def test_every_tower_takes_a_pooled_multi_hot_field_and_trains_its_table(name):
    import copy

    from funnel.inference import dense_layers_to_bf16, predict_table
    from funnel.models import create_model
    from funnel.synthetic import SyntheticSpec, generate

    frame = generate(SyntheticSpec(rows=200, n_users=20, n_items=30, history_len=6))
    frame["tags"] = frame["history"]  # the behaviour history, pooled as a bag too
    args = {"din": {"sequence": "history"}, "field_sum": {"groups": {"user": ["user_id"], "item": ["item_id", "tags"]}}}
    cfg = config_from_dict(
        {
            "data": {"train": "unused.csv"},
            "features": [
                {"name": "user_id", "kind": "categorical"},
                {"name": "item_id", "kind": "categorical"},
                {"name": "history", "kind": "sequence", "share_with": "item_id", "max_len": 6},
                {"name": "tags", "kind": "multi_hot", "share_with": "item_id", "pooling": "sum"},
                {"name": "price", "kind": "numeric", "transform": "log1p"},
            ],
            "funnel": {
                "embed_dim": 4,
                "tower": {"type": name, **args.get(name, {})},
                "stages": [{"name": "click"}, {"name": "conversion", "after": "click"}],
            },
        }
    )
    graph = build_graph(cfg)
    fz = Featurizer(cfg, graph).fit(frame)
    torch.manual_seed(0)
    model = create_model(graph, cfg.funnel, fz.layout())
    table = fz.encode(frame, "train")
    batch = take(table.tensors(), slice(0, 64))
    batch[CAT] = batch[CAT].clone()
    batch[CAT][:, 1] = 0  # no item id, no history: the item_id table is reached through the bags only
    batch["seq/history"] = torch.zeros_like(batch["seq/history"])
    out = model(batch)
    assert all(torch.isfinite(out.log_reach[s]).all() for s in graph.names)
    model.loss(out, batch["labels"]).total.backward()
    grad = model.net.embeddings.table_grad("item_id")
    assert grad is not None and torch.isfinite(grad).all()
    in_bags = sorted(set(batch[bag_key("tags")].tolist()) - {0})
    touched = (grad.abs().sum(1) > 0).nonzero().squeeze(1).tolist()
    assert in_bags and set(touched) - {0} == set(in_bags)
    # and scores in bf16 (`funnel predict --bf16`) close to float32
    exact = predict_table(model, fz.encode(frame, "x", labels=False), 100)
    fast = predict_table(
        dense_layers_to_bf16(copy.deepcopy(model)), fz.encode(frame, "x", labels=False), 100, bf16=True
    )
    assert (fast - exact).abs().max().max() < 0.02


def test_a_multi_hot_feature_survives_the_saved_config_and_encoders_json(tmp_path):
    from funnel.runs import config_to_raw

    cfg = make_cfg(
        [
            {"name": "item", "kind": "categorical"},
            {"name": "tags", "kind": "multi_hot", "weights": "w", "max_len": 3, "pooling": "sum"},
            {"name": "seen", "kind": "multi_hot", "share_with": "item"},
        ]
    )
    back = config_from_dict(config_to_raw(cfg))
    assert back.features == cfg.features and back.data.train == str(Path.cwd() / cfg.data.train)  # paths absolute
    assert "max_len" not in config_to_raw(cfg)["features"][2]  # no cap: nothing written, none on reload
    df = pd.DataFrame(
        {"item": [1, 2, 2], "tags": ["a|b|c|d", "", "b"], "w": ["1|2|3|4", "", "5"], "seen": ["2|1", "3", ""]}
    )
    df["click"] = [1, 0, 1]
    fz = Featurizer(cfg, build_graph(cfg)).fit(df)
    fz.save(tmp_path / "encoders.json")
    loaded = Featurizer.load(tmp_path / "encoders.json", cfg, fz.graph)
    assert loaded.layout() == fz.layout()
    a, b = fz.encode(df, "x").tensors(), loaded.encode(df, "x").tensors()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # b is the most frequent (id 1), then a, c, d; max_len 3 keeps b, c, d of the first row
    assert a[bag_key("tags")].tolist() == [1, 3, 4, 1] and a[bag_weights_key("tags")].tolist() == [2, 3, 4, 5]
    assert a[bag_key("seen")].tolist() == [1, 2, 0]  # item's ids; 3 is not an item
