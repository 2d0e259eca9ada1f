"""The on-disk cache of encoders and encoded tensors: hits skip parsing, changes miss."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from funnel.data import cache, prepare
from funnel.data.datamodule import FunnelDataModule
from funnel.runs import build_graph
from funnel.spec import config_from_dict


def prepared(raw: dict) -> FunnelDataModule:
    cfg = config_from_dict(raw)
    dm = FunnelDataModule(cfg, build_graph(cfg))
    dm.prepare()
    for table in dm.tables.values():  # copied out of the memory-mapped entry: a test below edits its files
        table.cat, table.num, table.labels = table.cat.clone(), table.num.clone(), table.labels.clone()
    return dm


def same_tables(a: FunnelDataModule, b: FunnelDataModule) -> bool:
    return a.tables.keys() == b.tables.keys() and all(
        torch.equal(a.tables[k].cat, b.tables[k].cat)
        and torch.equal(a.tables[k].num, b.tables[k].num)
        and torch.equal(a.tables[k].labels, b.tables[k].labels)
        for k in a.tables
    )


def test_second_prepare_on_the_same_files_skips_parsing(base_config, tmp_path, monkeypatch):
    base_config["data"]["cache_dir"] = str(tmp_path / "c")
    first = prepared(base_config)
    assert len(list((tmp_path / "c").iterdir())) == 1

    def no_parsing(*args, **kwargs):
        raise AssertionError("the data was parsed again")

    monkeypatch.setattr(prepare, "iter_table", no_parsing)
    second = prepared(base_config)
    assert same_tables(first, second)
    assert second.featurizer.layout() == first.featurizer.layout()


def test_the_key_follows_the_bytes_and_the_encoding_not_the_path_or_mtime(base_config, synth_dir, tmp_path):
    key = cache.cache_key(config_from_dict(base_config))
    base_config["features"][0]["min_count"] = 3
    assert cache.cache_key(config_from_dict(base_config)) != key  # encoding changed
    base_config["features"][0].pop("min_count")
    copy = tmp_path / "train.csv"
    copy.write_bytes((synth_dir / "train.csv").read_bytes())
    base_config["data"]["train"] = str(copy)
    assert cache.cache_key(config_from_dict(base_config)) == key  # same bytes elsewhere
    os.utime(copy, ns=(1, 1))
    assert cache.cache_key(config_from_dict(base_config)) == key  # touched, same bytes
    copy.write_bytes(copy.read_bytes() + b"\n")
    assert cache.cache_key(config_from_dict(base_config)) != key  # bytes changed


def test_a_damaged_entry_is_a_miss_not_a_failure(base_config, tmp_path, caplog):
    base_config["data"]["cache_dir"] = str(tmp_path / "c")
    first = prepared(base_config)
    (entry,) = (tmp_path / "c").iterdir()
    (entry / "train.json").write_bytes(b"not a store file")
    second = prepared(base_config)
    assert same_tables(first, second)
    assert "ignoring the damaged cache entry" in caplog.text


def test_cache_off_and_synthetic_data_write_nothing(base_config, tmp_path):
    base_config["data"] |= {"cache_dir": str(tmp_path / "c"), "cache": False}
    prepared(base_config)
    assert not (tmp_path / "c").exists()
    raw = {
        "data": {"synthetic": {"rows": 500}, "cache_dir": str(tmp_path / "c")},
        "features": [{"name": "user_id", "kind": "categorical"}],
        "funnel": {"stages": [{"name": "click"}, {"name": "conversion", "after": "click"}]},
    }
    assert cache.cache_key(config_from_dict(raw)) is None


def test_a_failing_cache_write_only_warns(base_config, tmp_path, caplog, monkeypatch):
    base_config["data"]["cache_dir"] = str(tmp_path / "c")

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache, "publish", full_disk)
    assert prepared(base_config).tables["train"].cat.shape[0] > 0
    assert "could not write the data cache" in caplog.text
    assert not list((tmp_path / "c").iterdir())  # neither an entry nor a half-written temporary folder


def only_entry(root) -> Path:
    (entry,) = [p for p in root.iterdir() if not p.name.startswith(".")]
    return entry


def count_frame_reads(monkeypatch) -> list[int]:
    """Counts the preparations that read the files (one per prepare: fit and encode read train twice)."""
    calls = []
    real = prepare.prepare_store
    monkeypatch.setattr(cache, "prepare_store", lambda *a: calls.append(1) or real(*a))
    return calls


def test_a_valid_entry_hits_without_reading_the_frames(base_config, tmp_path, monkeypatch, caplog):
    base_config["data"]["cache_dir"] = str(tmp_path / "c")
    first = prepared(base_config)

    def no_reading(*args):
        raise AssertionError("the files were read again")

    monkeypatch.setattr(cache, "prepare_store", no_reading)
    second = prepared(base_config)
    assert same_tables(first, second)
    assert sorted(second.tables) == ["test", "train", "valid"]
    assert "cache entry" not in caplog.text


def test_a_same_size_edit_with_the_old_mtime_is_a_miss_that_reads_the_new_bytes(base_config, synth_dir, tmp_path):
    base_config["data"]["cache_dir"] = str(tmp_path / "c")
    train = tmp_path / "train.csv"
    train.write_bytes((synth_dir / "train.csv").read_bytes())
    base_config["data"]["train"] = str(train)
    first = prepared(base_config)
    before = train.stat()
    header, row, rest = train.read_bytes().split(b"\n", 2)
    columns, fields = header.split(b","), row.split(b",")
    click, conversion = columns.index(b"click"), columns.index(b"conversion")
    assert (fields[click], fields[conversion]) == (b"0", b"0")
    fields[click] = b"1"  # the first row becomes a click: same size, new bytes
    train.write_bytes(b"\n".join([header, b",".join(fields), rest]))
    os.utime(train, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (train.stat().st_size, train.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)

    second = prepared(base_config)
    assert first.tables["train"].labels[0, 0].item() == 0.0
    assert second.tables["train"].labels[0, 0].item() == 1.0
    assert second.tables["train"].labels[:, 0].sum().item() == first.tables["train"].labels[:, 0].sum().item() + 1
    assert len([p for p in (tmp_path / "c").iterdir() if not p.name.startswith(".")]) == 2  # a new entry


def test_an_edited_array_file_is_detected_warned_and_replaced(base_config, tmp_path, monkeypatch, caplog):
    base_config["data"]["cache_dir"] = str(tmp_path / "c")
    first = prepared(base_config)
    entry = only_entry(tmp_path / "c")
    original = (entry / CAT_FILE).read_bytes()
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0xFF  # same size, one byte of the ids changed
    (entry / CAT_FILE).write_bytes(bytes(flipped))

    reads = count_frame_reads(monkeypatch)
    second = prepared(base_config)
    assert reads == [1]
    assert f"ignoring the damaged cache entry {entry} ({CAT_FILE} does not match its checksum)" in caplog.text
    assert same_tables(first, second)
    assert (entry / CAT_FILE).read_bytes() == original  # rebuilt in place
    assert cache.problem(entry, entry.name, ["train", "valid", "test"]) is None
    assert prepared(base_config) and reads == [1]  # and the rebuilt entry hits


CAT_FILE = "train.a00.bin"  # the ids of the train split (the first array of the store)


def _inject_test_split(entry: Path) -> None:
    shutil.copy(entry / "valid.json", entry / "test.json")


def _inject_test_split_into_the_manifest_too(entry: Path) -> None:
    _inject_test_split(entry)
    manifest = json.loads((entry / "manifest.json").read_text())
    manifest["files"]["test.json"] = manifest["files"]["valid.json"]  # a consistent checksum
    (entry / "manifest.json").write_text(json.dumps(manifest))


def _rekey_manifest(entry: Path) -> None:
    manifest = json.loads((entry / "manifest.json").read_text())
    (entry / "manifest.json").write_text(json.dumps(manifest | {"key": "0" * 24}))


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        pytest.param(
            _inject_test_split, "files not in manifest.json: ['test.json'], missing: []", id="injected-test-split"
        ),
        pytest.param(
            _inject_test_split_into_the_manifest_too,
            "it holds the splits ['test', 'train', 'valid'], the config needs ['train', 'valid']",
            id="split-the-config-lacks",
        ),
        pytest.param(lambda e: (e / "manifest.json").unlink(), "no manifest.json", id="missing-manifest"),
        pytest.param(lambda e: (e / "manifest.json").write_text("{"), "unreadable manifest.json", id="broken-manifest"),
        pytest.param(_rekey_manifest, "manifest.json belongs to another entry", id="manifest-of-another-key"),
        pytest.param(lambda e: (e / "valid.json").unlink(), "missing: ['valid.json']", id="missing-split"),
    ],
)
def test_an_entry_its_manifest_does_not_vouch_for_is_a_miss_and_is_rebuilt(
    tamper, reason, base_config, tmp_path, monkeypatch, caplog
):
    base_config["data"].pop("test")
    base_config["data"]["cache_dir"] = str(tmp_path / "c")
    first = prepared(base_config)
    entry = only_entry(tmp_path / "c")
    tamper(entry)

    reads = count_frame_reads(monkeypatch)
    second = prepared(base_config)
    assert reads == [1]
    assert f"ignoring the damaged cache entry {entry} (" in caplog.text
    assert reason in caplog.text
    assert sorted(second.tables) == ["train", "valid"]
    assert same_tables(first, second)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [entry.name]  # nothing aside, no temporary folder
    names = sorted(p.name for p in entry.iterdir())
    assert names[:2] == ["encoders.json", "manifest.json"] and "train.json" in names and "valid.json" in names


def test_build_replaces_a_damaged_entry_but_keeps_a_valid_one(base_config, tmp_path, caplog):
    base_config["data"]["cache_dir"] = str(tmp_path / "c")
    cfg = config_from_dict(base_config)
    prepared(base_config)
    entry = only_entry(tmp_path / "c")
    kept = (entry / "manifest.json").stat().st_ino
    graph = build_graph(cfg)

    def build() -> Path:
        return cache.build(cfg, graph, cache.Featurizer(cfg, graph), entry.name, lambda tables: None)

    assert build() == entry  # another process got there first
    assert (entry / "manifest.json").stat().st_ino == kept
    assert "cache entry" not in caplog.text

    (entry / "manifest.json").unlink()
    assert build() == entry
    assert f"replacing the damaged cache entry {entry} (no manifest.json)" in caplog.text
    assert cache.problem(entry, entry.name, ["train", "valid", "test"]) is None
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [entry.name]


def test_stale_temporary_folders_are_removed_and_fresh_ones_kept(base_config, tmp_path):
    root = tmp_path / "c"
    base_config["data"]["cache_dir"] = str(root)
    two_hours_ago = time.time() - 2 * 3600

    def folder(name: str, *, old_folder: bool, old_file: bool) -> Path:
        path = root / name
        path.mkdir(parents=True)
        (path / CAT_FILE).write_bytes(b"partial")
        if old_file:
            os.utime(path / CAT_FILE, (two_hours_ago, two_hours_ago))
        if old_folder:
            os.utime(path, (two_hours_ago, two_hours_ago))
        return path

    killed = folder(f".{'a' * 24}-killed", old_folder=True, old_file=True)
    writing = folder(f".{'b' * 24}-writing", old_folder=False, old_file=False)
    busy = folder(f".{'c' * 24}-busy", old_folder=True, old_file=False)  # a large file still being written
    not_ours = folder(".keep-old", old_folder=True, old_file=True)  # not named like save()'s folders

    prepared(base_config)  # a miss: load() and save() both sweep
    assert not killed.exists()
    assert writing.is_dir() and busy.is_dir() and not_ours.is_dir()

    killed_later = folder(f".{'d' * 24}-killed", old_folder=True, old_file=True)
    prepared(base_config)  # a hit sweeps too
    assert not killed_later.exists()
    assert writing.is_dir() and busy.is_dir() and not_ours.is_dir()
