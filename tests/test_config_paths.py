"""Paths in a config file are relative to its folder; the run's config.yaml is resolved (absolute
paths, every argument) and reproduces the run from any working directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from funnel.cli import main
from funnel.spec import load_config


def _project(tmp_path: Path, synth_dir: Path, base_config: dict) -> Path:
    """project/cfg/config.yaml whose data paths are relative to cfg/: ../data/*.csv."""
    data = tmp_path / "project" / "data"
    data.mkdir(parents=True)
    for name in ("train.csv", "valid.csv", "test.csv"):
        shutil.copy(synth_dir / name, data / name)
    raw = dict(base_config)
    raw["data"] = {**raw["data"], **{k: f"../data/{k}.csv" for k in ("train", "valid", "test")}}
    raw["run_dir"] = "../runs/first"
    (tmp_path / "project" / "cfg").mkdir()
    path = tmp_path / "project" / "cfg" / "config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_relative_paths_resolve_against_the_config_files_folder(tmp_path, synth_dir, base_config, monkeypatch):
    path = _project(tmp_path, synth_dir, base_config)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg, _ = load_config(Path("..") / "project" / "cfg" / "config.yaml")
    assert cfg.data.train == str(tmp_path / "project" / "cfg" / ".." / "data" / "train.csv")
    assert Path(cfg.data.train).resolve() == (tmp_path / "project" / "data" / "train.csv").resolve()
    assert Path(cfg.run_dir).resolve() == (tmp_path / "project" / "runs" / "first").resolve()
    # an override is relative to the working directory, as any command-line path
    cfg, _ = load_config(path, ["data.test=mine.csv"])
    assert cfg.data.test == "mine.csv"
    # ${data_dir} and absolute paths stay as written
    raw = yaml.safe_load(path.read_text())
    raw["data"]["train"] = "${data_dir}/x.csv"
    raw["data"]["valid"] = str(tmp_path / "abs.csv")
    path.write_text(yaml.safe_dump(raw))
    cfg, _ = load_config(path)
    assert cfg.data.train == "${data_dir}/x.csv" and cfg.data.valid == str(tmp_path / "abs.csv")


def test_check_from_another_folder_finds_the_data(tmp_path, synth_dir, base_config, monkeypatch, capsys):
    path = _project(tmp_path, synth_dir, base_config)
    monkeypatch.chdir(tmp_path)
    assert main(["check", str(path.relative_to(tmp_path))]) == 0


def test_the_saved_config_is_resolved_and_reproduces_the_run_from_anywhere(
    tmp_path, synth_dir, base_config, monkeypatch
):
    path = _project(tmp_path, synth_dir, base_config)
    monkeypatch.chdir(path.parent)
    assert main(["fit", "config.yaml"]) == 0
    run = tmp_path / "project" / "runs" / "first"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    for key in ("train", "valid", "test"):
        assert Path(saved["data"][key]).is_absolute()
    assert Path(saved["run_dir"]).is_absolute()
    assert saved["funnel"]["tower"] == {
        "type": "mlp",
        "activation": "relu",
        "batch_norm": False,
        "dropout": 0.0,
        "hidden": [8],
    }
    assert saved["funnel"]["model"]["share_embeddings"] is True  # the model's defaults too
    assert saved["init_from"] is None and saved["data"]["test_split"] is None  # nulls are written
    third = tmp_path / "third"
    third.mkdir()
    monkeypatch.chdir(third)
    assert main(["fit", str(run / "config.yaml"), f"run_dir={third / 'again'}"]) == 0
    first = json.loads((run / "metrics.json").read_text())
    again = json.loads((third / "again" / "metrics.json").read_text())
    assert first == again
