"""Tests for funnel.synthetic: determinism, funnel consistency, calibration, selection bias, I/O."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from funnel.synthetic import (
    FEATURE_COLUMNS,
    SyntheticSpec,
    generate,
    generate_days,
    split_frames,
    truth_columns,
    write,
)

SMALL = SyntheticSpec(rows=20_000, n_users=500, n_items=300)
FIVE = ("click", "cart", "checkout", "pay", "review")


@pytest.fixture(scope="module")
def small() -> pd.DataFrame:
    return generate(SMALL)


def test_same_seed_gives_identical_frame(small):
    pd.testing.assert_frame_equal(small, generate(SMALL))


def test_different_seed_gives_different_frame(small):
    other = generate(SyntheticSpec(rows=20_000, n_users=500, n_items=300, seed=1))
    assert not small["true_p_click"].equals(other["true_p_click"])
    assert not (small["user_id"] == other["user_id"]).all()


def test_columns_are_features_labels_then_truth(small):
    assert list(small.columns) == [*FEATURE_COLUMNS, "click", "conversion", *truth_columns(SMALL.stages)]
    assert len(small) == SMALL.rows


def test_features_have_documented_ranges(small):
    assert small["hour"].between(0, 23).all()
    assert (small["price"] > 0).all()
    visits = small["n_prev_visits"]
    assert 0.005 < visits.isna().mean() < 0.04
    assert (visits.dropna() >= 0).all() and (visits.dropna() % 1 == 0).all()
    # item_category and user_age are functions of their ids
    assert small.groupby("item_id")["item_category"].nunique().max() == 1
    assert small.groupby("user_id")["user_age"].nunique().max() == 1


@pytest.mark.parametrize("stages", [("click",), ("click", "conversion"), FIVE])
def test_labels_follow_parent_times_counterfactual(stages):
    df = generate(SyntheticSpec(rows=5_000, stages=stages))
    parent = np.ones(len(df), dtype=np.int64)
    for s in stages:
        assert set(np.unique(df[s])) <= {0, 1}
        np.testing.assert_array_equal(df[s].to_numpy(), parent * df[f"cf_{s}"].to_numpy())
        parent = df[s].to_numpy()


@pytest.mark.parametrize("stages", [("click", "conversion"), FIVE])
def test_path_probability_is_product_of_conditionals(stages):
    df = generate(SyntheticSpec(rows=5_000, stages=stages))
    path = np.ones(len(df))
    for s in stages:
        path = path * df[f"true_p_{s}_cond"].to_numpy()
        assert np.allclose(df[f"true_p_{s}"], path)
        assert df[f"true_p_{s}_cond"].between(0, 1, inclusive="neither").all()


@pytest.mark.parametrize("rates", [None, (0.2, 0.05, 0.5)])
def test_target_rates_are_hit_on_parent_positive_rows(rates):
    spec = SyntheticSpec(rows=50_000, stages=("click", "cart", "buy"), rates=rates)
    df = generate(spec)
    parent = np.ones(len(df), dtype=bool)
    for s, target in zip(spec.stages, spec.target_rates, strict=True):
        mean = df.loc[parent, f"true_p_{s}_cond"].mean()
        assert abs(mean - target) < 0.1 * target, (s, mean, target)
        parent = df[s].to_numpy() == 1


def _clicked_vs_all_gap(bias_share: float) -> float:
    df = generate(SyntheticSpec(rows=50_000, bias_share=bias_share))
    cond = df["true_p_conversion_cond"]
    return abs(cond[df["click"] == 1].mean() - cond.mean())


def test_clickbait_makes_clicked_rows_unrepresentative():
    no_bias, strong_bias = _clicked_vs_all_gap(0.0), _clicked_vs_all_gap(0.6)
    assert strong_bias > no_bias + 0.03, (no_bias, strong_bias)


def test_split_is_disjoint_sized_and_deterministic(small):
    frames = split_frames(small, SMALL)
    assert {k: len(v) for k, v in frames.items()} == {"train": 16_000, "valid": 2_000, "test": 2_000}
    # Rows are identified by their (unique) float truth values.
    keys = {k: set(v["true_p_conversion"]) for k, v in frames.items()}
    assert not (keys["train"] & keys["valid"] or keys["train"] & keys["test"] or keys["valid"] & keys["test"])
    assert all(list(v.index) == list(range(len(v))) for v in frames.values())
    pd.testing.assert_frame_equal(frames["test"], split_frames(small, SMALL)["test"])


def test_write_creates_csvs_and_truth(tmp_path):
    spec = SyntheticSpec(rows=3_000, n_users=100, n_items=80)
    paths = write(tmp_path / "out", spec)
    assert set(paths) == {"train", "valid", "test", "truth"}
    assert all(p.exists() for p in paths.values())
    test = pd.read_csv(paths["test"])
    assert len(test) == 300 and list(test.columns) == list(generate(spec).columns)
    truth = json.loads(paths["truth"].read_text())
    assert truth["spec"]["rows"] == 3_000
    assert set(truth["columns"]) == set(test.columns)
    assert 0.5 < truth["oracle_test"]["click"]["path_auc"] < 1


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"rows": 0}, "rows"),
        ({"rates": (0.1,)}, "rates"),
        ({"rates": (0.1, 1.5)}, "rates"),
        ({"stages": ("click", "click")}, "stages"),
        ({"stages": ()}, "stages"),
        ({"stages": tuple(f"s{i}" for i in range(9))}, "stages"),
        ({"stages": ("click", "price")}, "stages"),
        ({"valid_frac": 0.5, "test_frac": 0.5}, "valid_frac + test_frac"),
        ({"bias_share": 1.5}, "bias_share"),
        ({"noise": -1.0}, "noise"),
    ],
)
def test_bad_spec_raises_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=re.escape(field) + ".*(must|give|rename|lower)"):
        SyntheticSpec(**overrides)


def test_all_spec_problems_are_reported_at_once():
    with pytest.raises(ValueError) as err:
        SyntheticSpec(rows=-1, noise=-1.0)
    assert "rows=" in str(err.value) and "noise=" in str(err.value)


def test_branching_funnel_mixes_two_hidden_towers_and_keeps_labels_consistent():
    spec = SyntheticSpec(rows=20_000, stages=("click", "cart", "buy"), rates=(0.2, 0.3, 0.2), branch=True, seed=3)
    df = generate(spec)
    y2, y3, y4 = df["true_p_cart_cond"], df["true_p_buy_via_cart_cond"], df["true_p_buy_via_not_cart_cond"]
    assert np.allclose(df["true_p_buy_cond"], y2 * y3 + (1 - y2) * y4)
    assert np.allclose(df["true_p_buy"], df["true_p_click"] * df["true_p_buy_cond"])
    # buy follows click, not cart: it happens on clicked rows with and without a cart
    assert (df["buy"] <= df["click"]).all() and (df["cart"] <= df["click"]).all()
    clicked = df["click"] == 1
    assert ((df["buy"] == 1) & (df["cart"] == 0)).sum() > 0 and ((df["buy"] == 1) & (df["cart"] == 1)).sum() > 0
    # the counterfactual buy uses y3 where the counterfactual cart happened: buys are likelier after a cart
    assert df.loc[df["cf_cart"] == 1, "cf_buy"].mean() > df.loc[df["cf_cart"] == 0, "cf_buy"].mean()
    assert abs(df.loc[clicked, "true_p_buy_cond"].mean() - 0.2) < 0.02


def test_branching_needs_three_stages():
    with pytest.raises(ValueError, match="branch=True needs at least 3 stages"):
        SyntheticSpec(stages=("click", "buy"), branch=True)


def test_history_column_holds_recent_items_and_moves_the_truth():
    spec = SyntheticSpec(rows=20_000, n_users=300, n_items=200, history_len=8)
    df = generate(spec)
    tokens = df["history"].str.split("|")
    lengths = tokens.map(lambda t: 0 if t == [""] else len(t))
    assert lengths.between(0, 8).all() and lengths.max() == 8 and (lengths == 0).any()
    items = set(df["item_id"]) | {f"i{k}" for k in range(200)}
    assert all(t in items for row in tokens for t in row if t)
    cat_of = dict(zip(df["item_id"], df["item_category"], strict=True))
    share = [
        sum(cat_of.get(t) == c for t in row if t) / max(len([t for t in row if t]), 1)
        for row, c in zip(tokens, df["item_category"], strict=True)
    ]
    logit = np.log(df["true_p_click_cond"] / (1 - df["true_p_click_cond"]))
    assert np.corrcoef(share, logit)[0, 1] > 0.15  # the candidate's category in the history raises pCTR
    assert "history" not in generate(SyntheticSpec(rows=100)).columns  # opt-in: default data unchanged


def test_positions_lower_clicks_and_the_free_truth_is_position_one():
    df = generate(SyntheticSpec(rows=20_000, positions=4))
    assert sorted(df["position"].unique()) == [1, 2, 3, 4]
    assert df["position"].value_counts().min() == 5_000  # every slot equally often
    rate = df.groupby("position")["click"].mean()
    assert rate.is_monotonic_decreasing
    top = df["position"] == 1
    assert np.allclose(df.loc[top, "true_p_click_free"], df.loc[top, "true_p_click_cond"])
    assert (df.loc[~top, "true_p_click_free"] > df.loc[~top, "true_p_click_cond"]).all()
    assert (df["cf_click_free"] >= df["click"]).all()  # same uniform draw, higher probability
    assert {"position", "true_p_click_free"}.isdisjoint(generate(SyntheticSpec(rows=100)).columns)


DAY = SyntheticSpec(rows=20_000, n_users=500, n_items=300)


def _popularity_rank_corr(a: pd.DataFrame, b: pd.DataFrame, n_items: int) -> float:
    """Rank correlation of two days' item counts over the first day's catalogue."""
    ids = [f"i{k}" for k in range(n_items)]
    counts = [d["item_id"].value_counts().reindex(ids, fill_value=0).rank() for d in (a, b)]
    return float(np.corrcoef(*counts)[0, 1])


def test_days_keep_one_world_and_the_columns_of_generate():
    days = generate_days(DAY, 3, drift=0.3, new_items_per_day=10)
    assert len(days) == 3 and all(len(d) == DAY.rows for d in days)
    assert all(list(d.columns) == list(generate(DAY).columns) for d in days)
    both = pd.concat(days)
    # the ids' hidden attributes do not change from day to day
    assert both.groupby("item_id")["item_category"].nunique().max() == 1
    assert both.groupby("user_id")["user_age"].nunique().max() == 1
    assert not days[0]["user_id"].equals(days[1]["user_id"])  # each day draws its own impressions


def test_drift_moves_item_popularity_between_days():
    still = generate_days(DAY, 6, drift=0.0)
    moving = generate_days(DAY, 6, drift=0.5)
    still_corr = _popularity_rank_corr(still[0], still[-1], DAY.n_items)
    moving_corr = _popularity_rank_corr(moving[0], moving[-1], DAY.n_items)
    assert moving_corr < still_corr - 0.1, (still_corr, moving_corr)
    # the same world: day 0 does not depend on the drift
    pd.testing.assert_frame_equal(still[0], moving[0])


def test_new_items_appear_only_from_their_day_on():
    days = generate_days(DAY, 5, drift=0.3, new_items_per_day=20)
    for day, frame in enumerate(days):
        ids = frame["item_id"].str[1:].astype(int)
        assert ids.max() < DAY.n_items + 20 * day  # nothing from a later day
        if day:
            born_today = ids.between(DAY.n_items + 20 * (day - 1), DAY.n_items + 20 * day - 1)
            assert born_today.any()
    assert days[0]["item_id"].str[1:].astype(int).max() < DAY.n_items


def test_each_day_is_reproducible_from_the_seed():
    first, again = generate_days(DAY, 3, 0.3, 10), generate_days(DAY, 3, 0.3, 10)
    for a, b in zip(first, again, strict=True):
        pd.testing.assert_frame_equal(a, b)
    other = generate_days(SyntheticSpec(rows=20_000, n_users=500, n_items=300, seed=1), 3, 0.3, 10)
    assert not first[2]["true_p_click"].equals(other[2]["true_p_click"])


@pytest.mark.parametrize(
    ("spec", "args", "field"),
    [
        (DAY, (0, 0.3, 0), "days=0"),
        (DAY, (2.5, 0.3, 0), "days=2.5"),
        (DAY, (3, -0.1, 0), "drift=-0.1"),
        (DAY, (3, float("nan"), 0), "drift=nan"),
        (DAY, (3, 0.3, -5), "new_items_per_day=-5"),
        (SyntheticSpec(rows=100, history_len=4), (3, 0.3, 0), "history_len=4"),
    ],
)
def test_bad_day_arguments_raise_naming_the_argument(spec, args, field):
    with pytest.raises(ValueError, match=re.escape(field) + ".*(must|set)"):
        generate_days(spec, *args)
