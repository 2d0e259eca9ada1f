"""The typed feature layout: from a fitted featurizer, from the config alone, and the model built on it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from funnel.data.featurizer import Featurizer
from funnel.data.layout import FeatureLayout, FieldLayout, TableLayout
from funnel.data.table import CAT, SEQ
from funnel.errors import ConfigError
from funnel.models.bias import BiasTower
from funnel.models.embedding import SharedEmbeddings
from funnel.models.registry import create_model
from funnel.runs import build_graph
from funnel.spec import config_from_dict, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))

FEATURES = [
    {"name": "user", "kind": "categorical", "min_count": 2},
    {"name": "item", "kind": "categorical", "hash_buckets": 50},
    {"name": "item2", "kind": "categorical", "embed_dim": 4},
    {"name": "price", "kind": "numeric", "transform": "log1p"},
    {"name": "hist", "kind": "sequence", "share_with": "item", "max_len": 3, "embed_dim": 5},  # item's width wins
    {"name": "age", "kind": "numeric"},
    {"name": "hist2", "kind": "sequence", "max_len": 4, "embed_dim": 6, "pooling": "sum"},
    {"name": "position", "kind": "categorical"},
]


def make_cfg(features=None, **funnel):
    return config_from_dict(
        {
            "data": {"train": "t.csv"},
            "features": features or FEATURES,
            "funnel": {"stages": [{"name": "click"}, {"name": "conversion", "after": "click"}], **funnel},
        }
    )


def frame(n: int = 64) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    df = pd.DataFrame(
        {
            "user": rng.choice([f"u{k}" for k in range(8)], n),
            "item": rng.choice([f"i{k}" for k in range(30)], n),
            "item2": rng.integers(0, 12, n),
            "price": rng.uniform(0, 100, n),
            "age": np.where(rng.random(n) < 0.2, np.nan, rng.normal(40, 10, n)),  # gaps: a missing flag
            "hist": ["|".join(rng.choice([f"i{k}" for k in range(30)], rng.integers(0, 5))) for _ in range(n)],
            "hist2": ["|".join(rng.choice(list("abcdefg"), rng.integers(0, 6))) for _ in range(n)],
            "position": rng.integers(1, 6, n),
            "click": rng.integers(0, 2, n),
        }
    )
    df["conversion"] = df["click"] * rng.integers(0, 2, n)
    return df


def fitted(cfg=None) -> Featurizer:
    cfg = cfg or make_cfg()
    return Featurizer(cfg, build_graph(cfg)).fit(frame())


def cat(name: str, table: str, column: int, dim: int) -> FieldLayout:
    return FieldLayout(name, "categorical", CAT, table, dim, column=column)


def seq(name: str, table: str, dim: int, pooling: str) -> FieldLayout:
    return FieldLayout(name, "sequence", SEQ, table, dim, pooling=pooling)


# the layout the featurizer gave as a dict before it was typed, entry for entry
EXPECTED = FeatureLayout(
    tables=(
        TableLayout("user", 9, 8),  # 8 users seen twice or more, plus the unknown id 0
        TableLayout("item", 51, 8),  # hash_buckets + 1
        TableLayout("item2", 13, 4),
        TableLayout("hist2", 8, 6),  # its own vocabulary of 7 items
        TableLayout("position", 6, 8),
    ),
    fields=(
        cat("user", "user", 0, 8),
        cat("item", "item", 1, 8),
        cat("item2", "item2", 2, 4),
        cat("position", "position", 3, 8),
        seq("hist", "item", 8, "mean"),
        seq("hist2", "hist2", 6, "sum"),
    ),
    numeric_dim=3,  # price, age and age's missing flag
)


def test_the_fitted_layout_lists_every_table_field_column_and_width():
    assert fitted().layout() == EXPECTED


def test_a_shared_feature_looks_up_its_owners_table_at_its_owners_width():
    layout = fitted().layout()
    assert layout.field("hist").table == "item" and layout.field("hist").dim == layout.table("item").dim == 8
    assert "hist" not in {t.name for t in layout.tables}  # no table of its own


def test_the_helpers_find_tables_and_fields_by_name_kind_and_block():
    layout = fitted().layout()
    assert layout.table("item2") == TableLayout("item2", 13, 4)
    assert layout.field("position").column == 3
    assert [f.name for f in layout.fields_of("sequence")] == ["hist", "hist2"]
    assert [f.name for f in layout.fields_in(CAT)] == ["user", "item", "item2", "position"]
    with pytest.raises(KeyError, match="price"):
        layout.field("price")  # numerics are columns of batch[NUM], not fields
    with pytest.raises(KeyError, match="hist"):
        layout.table("hist")


def test_the_layout_is_frozen_and_checks_its_tables():
    with pytest.raises(dataclasses.FrozenInstanceError):
        EXPECTED.numeric_dim = 4
    with pytest.raises(ValueError, match="nope"):
        FeatureLayout(tables=(), fields=(cat("a", "nope", 0, 2),), numeric_dim=0)


def test_the_bias_features_table_goes_to_the_bias_tower_only():
    layout = fitted().layout()
    emb = SharedEmbeddings(layout, exclude=frozenset({"position"}))
    assert emb.table_names == ("user", "item", "item2", "hist2")
    bias = BiasTower(layout, ["position"], hidden=(4,))
    assert bias.columns == [("m_position", 3)]
    assert bias.tables["m_position"].weight.shape == (6, 8)


def test_a_loaded_featurizer_gives_the_same_layout(tmp_path):
    fz = fitted()
    fz.save(tmp_path / "encoders.json")
    assert Featurizer.load(tmp_path / "encoders.json", fz.cfg, fz.graph).layout() == EXPECTED


# ---- identical numbers ---------------------------------------------------------------------------------------
# Captured with the dict layout (before FeatureLayout): seed 0, the fitted EXPECTED layout, the
# first four rows of `frame()`. The typed layout must build the same tables from the same
# random stream.
GOLDEN_FLAT_SUM = [1.4461374282836914, 1.659115195274353, -0.8313210606575012, 0.8804717063903809]
GOLDEN_FLAT_ROW0 = [0.11074397712945938, -0.0068344310857355595, -0.05090804025530815, 0.008920270018279552]
GOLDEN_BIAS = [-0.1164691150188446, -0.1070469319820404, -0.1070469319820404, -0.12227297574281693]
GOLDEN_WEIGHTS = {"d8": -0.07956087589263916, "d4": -0.11489345133304596, "d6": 0.5274543166160583}


def test_embeddings_built_from_the_layout_give_the_numbers_of_the_dict_layout():
    fz = fitted()
    batch = {k: v[:4] for k, v in fz.encode(frame(), "train").tensors().items()}
    torch.manual_seed(0)
    # the golden numbers were drawn with std 0.05 (the default before issue 14)
    emb = SharedEmbeddings(fz.layout(), init_std=0.05, exclude=frozenset({"position"}))
    bias = BiasTower(fz.layout(), ["position"], hidden=(4,), init_std=0.05)
    with torch.no_grad():
        flat = emb(batch).flat
        logit = bias.eval()(batch)
    assert list(emb.state_dict()) == ["fused.d8.weight", "fused.d4.weight", "fused.d6.weight"]
    assert {k: t.weight.sum().item() for k, t in emb.fused.items()} == pytest.approx(GOLDEN_WEIGHTS, rel=1e-6)
    assert flat.sum(1).tolist() == pytest.approx(GOLDEN_FLAT_SUM, rel=1e-5, abs=1e-7)
    assert flat[0, :4].tolist() == pytest.approx(GOLDEN_FLAT_ROW0, rel=1e-6)
    assert logit.tolist() == pytest.approx(GOLDEN_BIAS, rel=1e-5)


# ---- before any data -----------------------------------------------------------------------------------------
def test_the_placeholder_layout_is_the_fitted_one_but_for_vocabulary_sizes_and_missing_flags():
    placeholder = FeatureLayout.placeholder(make_cfg(), rows=2)
    assert placeholder.fields == EXPECTED.fields
    assert [(t.name, t.dim) for t in placeholder.tables] == [(t.name, t.dim) for t in EXPECTED.tables]
    assert {t.name: t.rows for t in placeholder.tables} == {
        "user": 2,
        "item": 51,  # hashed: known from the config
        "item2": 2,
        "hist2": 2,
        "position": 2,
    }
    assert placeholder.numeric_dim == 2  # one column per numeric feature, no missing flags
    assert FeatureLayout.placeholder(make_cfg(), rows=7).table("user").rows == 7


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_builds_its_model_on_the_meta_device_from_the_placeholder(path):
    cfg, _ = load_config(path)
    with torch.device("meta"):
        model = create_model(build_graph(cfg), cfg.funnel, FeatureLayout.placeholder(cfg))
    assert all(p.is_meta for p in model.parameters())


def test_the_placeholder_finds_a_model_config_error_before_any_data():
    cfg = make_cfg(tower={"type": "deepfm"})  # deepfm needs one embedding width; item2 has 4
    with pytest.raises(ConfigError, match="deepfm"), torch.device("meta"):
        create_model(build_graph(cfg), cfg.funnel, FeatureLayout.placeholder(cfg))
