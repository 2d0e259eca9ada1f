"""The streaming prepare pass: chunk by chunk it gives exactly what one in-memory pass gives."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from funnel.cli import main
from funnel.data.datamodule import FunnelDataModule
from funnel.runs import build_graph
from funnel.spec import config_from_dict


def modules(raw: dict) -> tuple[FunnelDataModule, FunnelDataModule]:
    """(streamed through the store, the in-memory reference) for one config."""
    cfg = config_from_dict(raw)
    streamed = FunnelDataModule(cfg, build_graph(cfg))
    streamed.prepare()
    reference = FunnelDataModule(cfg, build_graph(cfg))
    reference._prepare_in_memory()
    return streamed, reference


def assert_same(a: FunnelDataModule, b: FunnelDataModule) -> None:
    assert a.tables.keys() == b.tables.keys()
    for split in a.tables:
        ta, tb = a.tables[split].tensors(), b.tables[split].tensors()
        assert ta.keys() == tb.keys(), split
        for key in ta:
            assert torch.equal(ta[key].to(tb[key].dtype), tb[key]), (split, key)
    for ea, eb in zip(a.featurizer.encoders.values(), b.featurizer.encoders.values(), strict=True):
        sa, sb = ea.state(), eb.state()
        # vocabularies exactly; a numeric's mean and std merged across chunks within float64 rounding
        assert sa == {k: pytest.approx(v, rel=1e-12) if isinstance(v, float) else v for k, v in sb.items()}


@pytest.mark.parametrize("chunk_rows", [97, 1_000_000])
def test_chunked_prepare_equals_the_in_memory_pass(base_config, tmp_path, chunk_rows):
    base_config["data"] |= {"cache_dir": str(tmp_path / "c"), "chunk_rows": chunk_rows}
    base_config["features"][0]["min_count"] = 3  # counts must be merged across chunks before the cut
    streamed, reference = modules(base_config)
    assert_same(streamed, reference)
    assert streamed.store_dir is not None and streamed.tables["train"].cat.dtype == torch.int32


def test_the_held_out_valid_rows_are_the_in_memory_ones(base_config, tmp_path):
    base_config["data"] |= {"cache_dir": str(tmp_path / "c"), "chunk_rows": 101}
    base_config["data"].pop("valid")
    streamed, reference = modules(base_config)
    assert len(streamed.tables["valid"]) == len(reference.tables["valid"]) > 0
    assert_same(streamed, reference)


def test_a_folder_or_glob_of_parquet_shards_is_one_input(base_config, synth_dir, tmp_path):
    frame = pd.read_csv(synth_dir / "train.csv")
    shards = tmp_path / "shards"
    shards.mkdir()
    for k, start in enumerate(range(0, len(frame), 700)):
        frame.iloc[start : start + 700].to_parquet(shards / f"part-{k:03d}.parquet", index=False)
    frame.to_parquet(tmp_path / "whole.parquet", index=False)
    base_config["data"] |= {"cache_dir": str(tmp_path / "c"), "chunk_rows": 256}
    tables = {}
    for name, train in [("whole", tmp_path / "whole.parquet"), ("dir", shards), ("glob", shards / "part-*.parquet")]:
        base_config["data"]["train"] = str(train)
        cfg = config_from_dict(base_config)
        dm = FunnelDataModule(cfg, build_graph(cfg))
        dm.prepare()
        tables[name] = dm.tables["train"]
    assert len(tables["whole"]) == len(frame)
    for name in ("dir", "glob"):
        assert torch.equal(tables[name].cat, tables["whole"].cat) and torch.equal(tables[name].num, tables["whole"].num)


def test_an_empty_folder_is_refused_with_what_to_do(base_config, tmp_path, write_config, capsys):
    (tmp_path / "empty").mkdir()
    base_config["data"]["train"] = str(tmp_path / "empty")
    assert main(["prepare", str(write_config(base_config))]) == 2
    err = capsys.readouterr().err
    assert "holds no data file" in err and "Traceback" not in err


def test_prepare_writes_the_cache_that_fit_then_maps(base_config, tmp_path, write_config, capsys):
    base_config["data"]["cache_dir"] = str(tmp_path / "c")
    path = write_config(base_config)
    assert main(["prepare", str(path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"] == {"train": 2400, "valid": 300, "test": 300}
    assert report["store"].startswith(str(tmp_path / "c")) and report["bytes_per_row"] > 0
    assert main(["fit", str(path)]) == 0
    assert "data cache hit" in capsys.readouterr().err


def test_synthetic_data_cannot_be_prepared(write_config, capsys):
    raw = {
        "data": {"synthetic": {"rows": 500}},
        "features": [{"name": "user_id", "kind": "categorical"}],
        "funnel": {"stages": [{"name": "click"}]},
    }
    assert main(["prepare", str(write_config(raw))]) == 2
    assert "data.synthetic" in capsys.readouterr().err
