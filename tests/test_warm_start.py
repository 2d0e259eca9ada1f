"""Warm start (init_from): vocabularies grow, known ids keep their rows, the old model's scores stay."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from funnel.cli import main
from funnel.data.datamodule import FunnelDataModule
from funnel.inference import predict_table
from funnel.runs import build_graph
from funnel.spec import config_from_dict
from funnel.training import warm_start


@pytest.fixture(scope="module")
def first(make_config, tmp_path_factory):
    """Day 1: a run on the tiny synthetic CSVs."""
    base = tmp_path_factory.mktemp("warm")
    cfg = make_config(base / "day1")
    cfg["data"]["cache"] = False
    path = base / "day1.yaml"
    path.write_text(json.dumps(cfg))
    assert main(["fit", str(path)]) == 0
    return base, cfg


@pytest.fixture(scope="module")
def day2(first, synth_dir):
    """Day 2's train file: the first 600 rows get 150 users never seen on day 1 (new_0 ... new_149)."""
    base, _ = first
    frame = pd.read_csv(synth_dir / "train.csv")
    frame.loc[:599, "user_id"] = [f"new_{i % 150}" for i in range(600)]
    frame.to_csv(base / "day2.csv", index=False)
    return base / "day2.csv"


def day2_config(first, day2, run: str, **changes) -> dict:
    base, day1 = first
    cfg = json.loads(json.dumps(day1))
    cfg |= {"run_dir": str(base / run), "init_from": str(base / "day1")}
    cfg["data"]["train"] = str(day2)
    for key, value in changes.items():
        section, _, name = key.partition(".")
        cfg.setdefault(section, {})[name] = value
    return cfg


def test_before_training_the_warm_model_scores_known_ids_as_the_old_model(first, day2, synth_dir):
    cfg = config_from_dict(day2_config(first, day2, "unused"))
    graph = build_graph(cfg)
    source = warm_start.load_source(cfg)
    dm = FunnelDataModule(cfg, graph, grow_from=source.featurizer)
    dm.prepare()
    old_vocab = source.featurizer.encoders["user_id"].vocab
    new_vocab = dm.featurizer.encoders["user_id"].vocab
    assert new_vocab[: len(old_vocab)] == old_vocab  # every old id keeps its place (so its row)
    assert set(new_vocab[len(old_vocab) :]) == {f"new_{i}" for i in range(150)}  # the new users, appended
    model = warm_start.build_model(cfg, graph, dm.featurizer, source)

    test = pd.read_csv(synth_dir / "test.csv")  # day-1 ids only
    old = predict_table(source.model.eval(), source.featurizer.encode(test, "test", labels=False))
    new = predict_table(model.eval(), dm.featurizer.encode(test, "test", labels=False))
    pd.testing.assert_frame_equal(new, old, check_exact=False, atol=1e-6, rtol=0)

    old_rows = source.model.net.embeddings.table_weight("user_id")
    new_rows = model.net.embeddings.table_weight("user_id")
    assert torch.equal(new_rows[: len(old_rows)], old_rows)
    fresh = new_rows[len(old_rows) :]
    assert fresh.shape[0] == 150 and not torch.isclose(fresh, old_rows[:150]).all()  # fresh rows, not copies
    assert dm.featurizer.encoders["price"].state() == source.featurizer.encoders["price"].state()  # day 1's scale


def test_refit_numerics_fits_the_numeric_statistics_again(first, day2):
    raw = day2_config(first, day2, "unused", **{"warm_start.refit_numerics": True})
    raw["data"]["train"] = str(day2)
    frame = pd.read_csv(day2)
    frame["price"] = frame["price"] * 3
    frame.to_csv(day2.with_name("day2x3.csv"), index=False)
    raw["data"]["train"] = str(day2.with_name("day2x3.csv"))
    cfg = config_from_dict(raw)
    source = warm_start.load_source(cfg)
    dm = FunnelDataModule(cfg, build_graph(cfg), grow_from=source.featurizer)
    dm.prepare()
    assert dm.featurizer.encoders["price"].mean != source.featurizer.encoders["price"].mean


def test_fit_init_from_on_the_command_line_trains_the_next_day(first, day2, write_config, capsys):
    base, _ = first
    cfg = day2_config(first, day2, "day2")
    cfg.pop("init_from")
    assert main(["fit", str(write_config(cfg)), "--init-from", str(base / "day1")]) == 0
    assert json.loads((base / "day2" / "run.json").read_text())["status"] == "complete"
    saved = (base / "day2" / "config.yaml").read_text()
    assert f"init_from: {base / 'day1'}" in saved
    assert "init_from: started from" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"funnel.tower": {"type": "mlp", "hidden": [16]}}, ["funnel.tower", "hidden"]),
        ({"funnel.embed_dim": 8}, ["funnel.embed_dim"]),
    ],
)
def test_an_incompatible_run_is_refused_naming_the_difference(first, day2, write_config, capsys, change, words):
    base, _ = first
    cfg = day2_config(first, day2, "refused", **change)
    assert main(["fit", str(write_config(cfg))]) == 2
    err = capsys.readouterr().err
    assert "init_from" in err and all(w in err for w in words) and "Traceback" not in err
    assert not (base / "refused").exists()  # the claimed folder is removed again


def test_a_features_kind_change_is_refused(first, day2, write_config, capsys):
    cfg = day2_config(first, day2, "refused-kind")
    cfg["features"][2] = {"name": "device", "kind": "categorical", "hash_buckets": 7}
    assert main(["fit", str(write_config(cfg))]) == 2
    assert "feature 'device' has hash_buckets None there, 7 here" in capsys.readouterr().err


def test_init_from_a_folder_that_is_no_run_is_refused(first, day2, tmp_path, write_config, capsys):
    cfg = day2_config(first, day2, "refused-dir")
    (tmp_path / "empty").mkdir()
    cfg["init_from"] = str(tmp_path / "empty")
    assert main(["fit", str(write_config(cfg))]) == 2
    err = capsys.readouterr().err
    assert "init_from:" in err and "not a funnel run directory" in err
