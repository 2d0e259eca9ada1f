"""Numeric features as embeddings: quantile bins (a categorical-like field) and PLR (periodic)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from funnel.cli import main
from funnel.data.kinds import kind_of, new_encoders
from funnel.data.layout import FeatureLayout
from funnel.data.numeric_bins import QuantileBinEncoder, Reservoir
from funnel.data.table import CAT, NUM, take
from funnel.errors import DataError, UserError
from funnel.export import FORMATS, export_run, run_artefact
from funnel.inference import predict_table
from funnel.models.embedding import SharedEmbeddings
from funnel.models.numeric_embedding import PeriodicEmbedding
from funnel.spec import config_from_dict
from funnel.spec.schema import FeatureSpec
from funnel.training.fit import fit_config
from tests.test_export import data, encoded_test_rows, raw_config  # noqa: F401  (the fixture `data`)


def binned(bins: int = 4, **options) -> QuantileBinEncoder:
    return QuantileBinEncoder(FeatureSpec("x", "numeric", embedding="bins", bins=bins, **options))


def test_bin_edges_are_the_quantiles_of_the_train_values():
    enc = binned(4).fit(pd.Series([8, 1, 7, 2, 6, 3, 5, 4, np.nan]))
    # 1..8 at 1/4, 2/4, 3/4 (linear interpolation): positions 1.75, 3.5, 5.25 of the sorted values
    assert enc.edges == [2.75, 4.5, 6.25]
    assert enc.cardinality == 5  # 4 bins and the unknown id 0


def test_values_on_edges_go_to_the_lower_bin_outside_values_to_the_end_bins_and_missing_to_0():
    enc = binned(4).fit(pd.Series(np.arange(1.0, 9.0)))
    col = pd.Series([2.75, 2.76, 4.5, 6.25, 6.3, -100.0, 1e9, np.inf, -np.inf, np.nan, None])
    assert enc.encode(col).tolist() == [1, 2, 2, 3, 4, 1, 4, 4, 1, 0, 0]


def test_tied_quantiles_merge_into_fewer_bins():
    enc = binned(10).fit(pd.Series([0] * 90 + list(range(1, 11))))
    # eight quantiles at 0, and the 0.9 one at position 89.1 of the sorted values: 0.1
    assert enc.edges == pytest.approx([0.0, 0.1])
    assert enc.encode(pd.Series([0, 0.05, 5])).tolist() == [1, 2, 3]


def test_missing_error_refuses_a_gap_naming_the_column():
    with pytest.raises(DataError, match="'x' has 1 missing"):
        binned(missing="error").fit(pd.Series([1.0, None]))


def test_a_reservoir_keeps_a_bounded_seeded_uniform_sample():
    a, b = Reservoir(size=100, seed=3), Reservoir(size=100, seed=3)
    for chunk in np.array_split(np.arange(10_000.0), 7):
        a.add(chunk)
        b.add(chunk)
    assert len(a.values) == 100 and a.seen == 10_000 and np.array_equal(a.values, b.values)
    assert 3_000 < a.values.mean() < 7_000  # drawn from the whole stream, not its start


def test_bin_edges_round_trip_through_the_encoder_state():
    enc = binned(4).fit(pd.Series(np.arange(1.0, 9.0)))
    again = binned(4)
    again.load_state(json.loads(json.dumps(enc.state())))
    col = pd.Series([0.0, 3.0, 5.0, 9.0, np.nan])
    assert again.edges == enc.edges and np.array_equal(again.encode(col), enc.encode(col))
    with pytest.raises(ValueError, match="not increasing"):
        again.load_state({"edges": [2.0, 1.0]})


def test_bins_are_a_cat_field_and_plr_a_periodic_field_of_the_layout():
    features = [
        FeatureSpec("a", "categorical"),
        FeatureSpec("b", "numeric", embedding="bins", bins=8),
        FeatureSpec("c", "numeric"),
        FeatureSpec("d", "numeric", embedding="plr", frequencies=3, embed_dim=5),
    ]
    encoders = new_encoders(features)
    assert kind_of(features[1]).block == CAT and kind_of(features[3]).block == NUM
    layout = FeatureLayout.from_encoders(features, 4, encoders, vocab_rows=2)
    assert [(f.name, f.column) for f in layout.fields] == [("a", 0), ("b", 1)]
    assert layout.table("b").rows == 9 and layout.numeric_dim == 2
    assert [(p.name, p.column, p.dim) for p in layout.periodic] == [("d", 1, 5)]
    emb = SharedEmbeddings(layout)
    x = emb({CAT: torch.tensor([[1, 3], [0, 8]]), NUM: torch.tensor([[0.5, -1.0], [0.0, 2.0]])})
    assert list(x.fields) == ["a", "b", "d"] and x.fields["d"].shape == (2, 5)
    assert x.flat.shape == (2, emb.shape.flat_dim) == (2, 4 + 4 + 5 + 2)  # fields, then numerics


def test_plr_gives_one_vector_per_row_and_its_frequencies_learn():
    torch.manual_seed(0)
    plr = PeriodicEmbedding(frequencies=6, dim=4, sigma=0.5)
    out = plr(torch.randn(10))
    assert out.shape == (10, 4) and (out >= 0).all()
    out.sum().backward()
    assert plr.frequencies.grad is not None and plr.frequencies.grad.abs().sum() > 0


def test_fit_end_to_end_with_a_binned_and_a_periodic_feature(base_config, write_config, tmp_path):
    base_config["features"][4] |= {"embedding": "bins", "bins": 8}  # price
    base_config["features"][5] |= {"embedding": "plr", "frequencies": 4, "sigma": 0.5}  # n_prev_visits
    assert main(["fit", str(write_config(base_config))]) == 0
    run = tmp_path / "run"
    state = {f["spec"]["name"]: f["state"] for f in json.loads((run / "encoders.json").read_text())["features"]}
    assert 2 <= len(state["price"]["edges"]) <= 7 and "mean" in state["n_prev_visits"]
    assert "auc/conversion" in (run / "metrics.json").read_text()  # trained, then scored on test


@pytest.mark.parametrize(
    ("feature", "message"),
    [
        ({"name": "p", "kind": "numeric", "embedding": "bins", "bins": 0}, r"features\[0\]: bins must be >= 2"),
        ({"name": "p", "kind": "categorical", "frequencies": 8}, r"features\[0\]\.frequencies: a categorical"),
        ({"name": "p", "kind": "numeric", "bins": 8}, r"features\[0\]\.bins: takes effect only with `embedding: bins"),
        ({"name": "p", "kind": "numeric", "embedding": "bins", "sigma": 2.0}, r"features\[0\]\.sigma: .*plr"),
        ({"name": "p", "kind": "numeric", "embedding": "knn"}, r"features\[0\]\.embedding"),
    ],
)
def test_bad_numeric_embedding_options_are_config_errors_naming_the_key(base_config, feature, message):
    base_config["features"] = [feature, {"name": "user_id", "kind": "categorical"}]
    with pytest.raises(UserError, match=message):
        config_from_dict(base_config)


PLR_FEATURES = [
    {"name": "price_bins", "kind": "numeric", "column": "price", "embedding": "bins", "bins": 8},
    {"name": "visits_plr", "kind": "numeric", "column": "n_prev_visits", "embedding": "plr", "frequencies": 4},
]


def test_an_exported_graph_with_bins_and_plr_gives_what_predict_gives(data, tmp_path):  # noqa: F811
    tower = {"tower": {"type": "deepfm", "hidden": [8]}}
    run_dir = fit_config(config_from_dict(raw_config(data["chain"], tmp_path / "run", tower, PLR_FEATURES)))
    model, table, inputs = encoded_test_rows(run_dir, data["chain"])
    want = predict_table(model, table)
    batch = take(table.tensors(), slice(0, 9))
    for fmt in FORMATS:
        out = export_run(run_dir, fmt, tmp_path / fmt)
        manifest = json.loads((out / "manifest.json").read_text())
        got = run_artefact(fmt, out / manifest["file"], inputs, tuple(batch[i.key] for i in inputs))
        for column, values in zip(want.columns, got, strict=True):
            assert np.allclose(values.numpy(), want[column].to_numpy()[:9], atol=1e-5), (fmt, column)
