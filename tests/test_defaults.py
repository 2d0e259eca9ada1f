"""The defaults of issue 14: `transform: auto`, embeddings N(0, 1), early stopping by default."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pandas as pd
import pytest
import yaml

from funnel.cli import main
from funnel.data.encoders import NumericEncoder
from funnel.data.streaming import Moments
from funnel.spec.schema import DEFAULT_MAX_EPOCHS, FeatureSpec, TrainerSpec


def num(**kw) -> FeatureSpec:
    return FeatureSpec(name=kw.pop("name", "x"), kind="numeric", **kw)


def chunked(enc: NumericEncoder, col: pd.Series, cuts: list[int]) -> NumericEncoder:
    for part in np.split(col.to_numpy(), np.cumsum(cuts)[:-1]):
        enc.observe(pd.Series(part))
    return enc.finalize()


# Hand-checked: nine 0s and a 100 have mean 10, m2/n = 900 and m3/n = 72,000, so skewness
# 72,000 / 900^1.5 = 2.67; one -1 among them keeps the skew but rules log1p out; 1..5 has 0.
# Either side of the threshold 1: 0, 0, 0, 1 has (3/32) / (3/16)^1.5 = 1.15; 0, 0, 1 has
# (2/27) / (2/9)^1.5 = 0.71.
@pytest.mark.parametrize(
    ("values", "skewness", "chosen"),
    [
        ([0.0] * 9 + [100.0], 72_000 / 900**1.5, "log1p"),
        ([0.0, 0.0, 0.0, 1.0], (3 / 32) / (3 / 16) ** 1.5, "log1p"),
        ([0.0, 0.0, 1.0], (2 / 27) / (2 / 9) ** 1.5, "standardize"),
        ([-1.0] + [0.0] * 8 + [100.0], None, "standardize"),
        ([1.0, 2.0, 3.0, 4.0, 5.0], 0.0, "standardize"),
    ],
)
def test_auto_takes_log1p_only_for_a_non_negative_skewed_column(values, skewness, chosen):
    enc = NumericEncoder(num()).fit(pd.Series(values))
    assert enc.transform == chosen
    x = np.log1p(values) if chosen == "log1p" else np.asarray(values)
    assert enc.mean == pytest.approx(x.mean()) and enc.std == pytest.approx(x.std())
    if skewness is not None:
        moments = Moments()
        moments.add(np.asarray(values))
        assert moments.skewness == pytest.approx(skewness)


def test_auto_takes_log1p_for_a_lognormal_and_standardize_for_a_normal_column():
    rng = np.random.default_rng(0)
    assert NumericEncoder(num()).fit(pd.Series(rng.lognormal(3, 1, 5_000))).transform == "log1p"
    assert NumericEncoder(num()).fit(pd.Series(rng.normal(50, 5, 5_000))).transform == "standardize"
    # negatives rule log1p out however skewed the column is
    assert NumericEncoder(num()).fit(pd.Series(rng.lognormal(3, 1, 5_000) - 1)).transform == "standardize"


def test_an_explicit_transform_is_kept_whatever_the_column():
    col = pd.Series(np.random.default_rng(0).lognormal(0, 1, 1_000))
    for transform in ("standardize", "log1p", "none"):
        assert NumericEncoder(num(transform=transform)).fit(col).transform == transform


@pytest.mark.parametrize("late_negative", [False, True])
def test_a_streaming_fit_makes_the_same_choice_as_one_fit(late_negative):
    rng = np.random.default_rng(2)
    values = rng.lognormal(2, 1, 10_000)
    values[rng.random(10_000) < 0.05] = np.nan
    if late_negative:
        values[9_990] = -3.0  # in the last chunk only
    col = pd.Series(values)
    whole = NumericEncoder(num()).fit(col)
    streamed = chunked(NumericEncoder(num()), col, [1, 999, 4_000, 3_333, 1_667])
    assert whole.transform == streamed.transform == ("standardize" if late_negative else "log1p")
    assert streamed.mean == pytest.approx(whole.mean, rel=1e-12) and streamed.std == pytest.approx(whole.std, rel=1e-12)
    assert streamed.flag and whole.flag


def test_chunked_moments_give_the_skewness_of_the_whole_column():
    x = np.random.default_rng(3).gamma(0.5, 2.0, 7_000)
    moments = Moments()
    for part in np.split(x, [3, 1_000, 5_500]):
        moments.add(part)
    dev = x - x.mean()
    assert moments.skewness == pytest.approx(np.mean(dev**3) / np.mean(dev**2) ** 1.5, rel=1e-10)
    assert moments.low == x.min()


def test_the_choice_round_trips_through_the_encoder_state():
    col = pd.Series(np.random.default_rng(0).lognormal(1, 1, 2_000))
    fitted = NumericEncoder(num()).fit(col)
    state = json.loads(json.dumps(fitted.state()))
    assert state["transform"] == "log1p"
    loaded = NumericEncoder(num())
    loaded.load_state(state)
    assert loaded.transform == "log1p"
    np.testing.assert_array_equal(loaded.encode(col), fitted.encode(col))


def test_an_encoder_state_without_the_choice_means_the_old_default_standardize():
    old = {"mean": 2.0, "std": 4.0, "flag": False}  # encoders.json written before `auto`
    auto = NumericEncoder(num())
    auto.load_state(old)
    assert auto.transform == "standardize"
    assert auto.encode(pd.Series([6.0]))[0, 0] == 1.0
    explicit = NumericEncoder(num(transform="log1p"))
    explicit.load_state(old)
    assert explicit.transform == "log1p"


def test_an_unknown_transform_in_the_state_is_refused():
    with pytest.raises(ValueError, match="transform 'auto'"):
        NumericEncoder(num()).load_state({"mean": 0.0, "std": 1.0, "flag": False, "transform": "auto"})


def test_a_negative_value_at_predict_time_names_the_auto_choice():
    from funnel.errors import DataError

    enc = NumericEncoder(num()).fit(pd.Series([0.0] * 9 + [100.0]))
    with pytest.raises(DataError, match="chosen by `transform: auto`"):
        enc.encode(pd.Series([-1.0]), "test")


def _no_transforms(config: dict) -> dict:
    config["features"] = [{k: v for k, v in f.items() if k != "transform"} for f in config["features"]]
    return config


def test_check_and_encoders_json_show_the_chosen_transform(base_config, write_config, capsys, tmp_path):
    from funnel.data.featurizer import Featurizer
    from funnel.data.sources import load_frames
    from funnel.runs import build_graph
    from funnel.spec import config_from_dict

    config = _no_transforms(base_config)
    assert main(["check", str(write_config(config))]) == 0
    report = json.loads("\n".join(capsys.readouterr().out.strip().splitlines()[:-1]))
    # the tiny synthetic train split: price skewness 2.3, n_prev_visits 2.6 (both >= 0)
    assert report["transforms"] == {"price": "log1p", "n_prev_visits": "log1p"}
    cfg = config_from_dict(config)
    graph = build_graph(cfg)
    featurizer = Featurizer(cfg, graph).fit(load_frames(cfg)["train"])
    featurizer.save(tmp_path / "encoders.json")
    saved = json.loads((tmp_path / "encoders.json").read_text())
    assert "log1p" in json.dumps(saved)
    loaded = Featurizer.load(tmp_path / "encoders.json", cfg, graph)
    assert {n: loaded.encoders[n].transform for n in report["transforms"]} == report["transforms"]


def test_print_config_shows_the_new_defaults(base_config, write_config, capsys):
    config = _no_transforms(base_config)
    config.pop("trainer")
    assert main(["fit", str(write_config(config)), "--print-config"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert {f["name"]: f.get("transform") for f in resolved["features"] if f["kind"] == "numeric"} == {
        "price": "auto",
        "n_prev_visits": "auto",
    }
    assert resolved["trainer"]["early_stopping"] == 2 and resolved["trainer"]["max_epochs"] == DEFAULT_MAX_EPOCHS
    assert TrainerSpec().kwargs["max_epochs"] == DEFAULT_MAX_EPOCHS == 10


def test_embeddings_start_from_pytorchs_own_n01():
    from funnel.models.bias import BiasTower
    from funnel.models.embedding import SharedEmbeddings

    for fn in (SharedEmbeddings.__init__, BiasTower.__init__):
        assert inspect.signature(fn).parameters["init_std"].default == 1.0
