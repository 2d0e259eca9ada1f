"""The on-disk cache of encoders and encoded tensors: hits skip parsing, changes miss."""

from __future__ import annotations

import os

import torch

from funnel.data import cache, sources
from funnel.data.datamodule import FunnelDataModule
from funnel.runs import build_graph
from funnel.spec import config_from_dict


def prepared(raw: dict) -> FunnelDataModule:
    cfg = config_from_dict(raw)
    dm = FunnelDataModule(cfg, build_graph(cfg))
    dm.prepare()
    return dm


def same_tables(a: FunnelDataModule, b: FunnelDataModule) -> bool:
    return a.tables.keys() == b.tables.keys() and all(
        torch.equal(a.tables[k].cat, b.tables[k].cat) and torch.equal(a.tables[k].num, b.tables[k].num)
        and torch.equal(a.tables[k].labels, b.tables[k].labels) for k in a.tables
    )


def test_second_prepare_on_the_same_files_skips_parsing(base_config, tmp_path, monkeypatch):
    base_config["data"]["cache_dir"] = str(tmp_path / "c")
    first = prepared(base_config)
    assert len(list((tmp_path / "c").iterdir())) == 1

    def no_parsing(*args, **kwargs):
        raise AssertionError("the data was parsed again")

    monkeypatch.setattr(sources, "read_table", no_parsing)
    second = prepared(base_config)
    assert same_tables(first, second)
    assert second.featurizer.layout() == first.featurizer.layout()


def test_a_changed_file_or_encoding_is_a_miss(base_config, synth_dir, tmp_path):
    base_config["data"]["cache_dir"] = str(tmp_path / "c")
    cfg = config_from_dict(base_config)
    key = cache.cache_key(cfg)
    base_config["features"][0]["min_count"] = 3
    assert cache.cache_key(config_from_dict(base_config)) != key  # encoding changed
    copy = tmp_path / "train.csv"
    copy.write_bytes((synth_dir / "train.csv").read_bytes())
    base_config["features"][0].pop("min_count")
    base_config["data"]["train"] = str(copy)
    key2 = cache.cache_key(config_from_dict(base_config))
    os.utime(copy, ns=(1, 1))
    assert cache.cache_key(config_from_dict(base_config)) != key2  # same path, new mtime


def test_a_damaged_entry_is_a_miss_not_a_failure(base_config, tmp_path, caplog):
    base_config["data"]["cache_dir"] = str(tmp_path / "c")
    first = prepared(base_config)
    (entry,) = (tmp_path / "c").iterdir()
    (entry / "train.pt").write_bytes(b"not a tensor file")
    second = prepared(base_config)
    assert same_tables(first, second)
    assert "ignoring the damaged cache entry" in caplog.text


def test_cache_off_and_synthetic_data_write_nothing(base_config, tmp_path):
    base_config["data"] |= {"cache_dir": str(tmp_path / "c"), "cache": False}
    prepared(base_config)
    assert not (tmp_path / "c").exists()
    raw = {"data": {"synthetic": {"rows": 500}, "cache_dir": str(tmp_path / "c")},
           "features": [{"name": "user_id", "kind": "categorical"}],
           "funnel": {"stages": [{"name": "click"}, {"name": "conversion", "after": "click"}]}}
    assert cache.cache_key(config_from_dict(raw)) is None


def test_a_failing_cache_write_only_warns(base_config, tmp_path, caplog, monkeypatch):
    base_config["data"]["cache_dir"] = str(tmp_path / "c")

    def full_disk(self, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache.Featurizer, "save", full_disk)
    assert prepared(base_config).tables["train"].cat.shape[0] > 0
    assert "could not write the data cache" in caplog.text
    assert not list((tmp_path / "c").iterdir())  # neither an entry nor a half-written temporary folder
