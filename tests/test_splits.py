"""Held-out splits: exact shares by a split seed independent of the model seed, the same rows in
memory and streaming, whole keys with split_by, a test split from one file, and the note when the
metrics are of the split that chose the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from funnel.cli import main
from funnel.data.sources import load_frames
from funnel.data.splits import TEST, VALID, Holdout, aligned
from funnel.spec import config_from_dict
from funnel.training.fit import VALID_ONLY


def frame(rows: int) -> pd.DataFrame:
    return pd.DataFrame({"x": np.arange(rows), "user": np.arange(rows) % 777})


def test_each_held_out_split_is_the_exact_share_of_every_block_of_1000_rows():
    codes = Holdout(0.1, 0.15, seed=3).assign(frame(12_345), last=True)
    # 12 whole blocks: 100 valid and 150 test rows each; the last 345 rows: round(34.5) = 34, round(51.75) = 52
    assert (codes == VALID).sum() == 12 * 100 + 34 and (codes == TEST).sum() == 12 * 150 + 52
    blocks = codes[:12_000].reshape(12, 1000)
    assert ((blocks == VALID).sum(1) == 100).all() and ((blocks == TEST).sum(1) == 150).all()
    small = Holdout(0.1, 0.0, seed=0).assign(frame(805), last=True)
    assert (small == VALID).sum() == 80 and not (small == TEST).any()  # round(80.5) = 80 (half to even)


@pytest.mark.parametrize("chunk", [1, 777, 1000, 5000, 20_000])
def test_a_streaming_read_in_chunks_gets_the_rows_of_the_in_memory_split(chunk):
    df = frame(12_345)
    whole = Holdout(0.1, 0.15, seed=3).assign(df, last=True)
    held = Holdout(0.1, 0.15, seed=3)
    parts = list(aligned(df.iloc[i : i + chunk] for i in range(0, len(df), chunk)))
    assert [last for _, last in parts] == [False] * (len(parts) - 1) + [True]
    assert all(len(c) % 1000 == 0 for c, last in parts if not last)
    assert pd.concat([c for c, _ in parts]).x.tolist() == df.x.tolist()
    assert np.array_equal(np.concatenate([held.assign(c, last) for c, last in parts]), whole)


def test_split_by_keeps_every_key_in_one_split():
    df = frame(20_000)
    codes = Holdout(0.2, 0.2, seed=5, key="user").assign(df, last=True)
    per_user = pd.DataFrame({"user": df.user, "code": codes}).groupby("user").code.nunique()
    assert per_user.max() == 1
    users = pd.DataFrame({"user": df.user, "code": codes}).drop_duplicates("user")
    assert 0.1 < (users.code == VALID).mean() < 0.3 and 0.1 < (users.code == TEST).mean() < 0.3
    other = Holdout(0.2, 0.2, seed=6, key="user").assign(df, last=True)
    assert not np.array_equal(codes, other)  # the split seed chooses


def _one_file(base_config, **data) -> dict:
    raw = base_config
    raw["data"] = {"train": raw["data"]["train"], "batch_size": 256, **data}
    return raw


def test_the_held_out_rows_depend_on_the_split_seed_not_on_the_model_seed(base_config):
    raw = _one_file(base_config, test_split=0.2)
    a = load_frames(config_from_dict({**raw, "seed": 0}))
    b = load_frames(config_from_dict({**raw, "seed": 1}))
    for split in ("train", "valid", "test"):
        assert a[split].equals(b[split])
    assert [len(a[s]) for s in ("train", "valid", "test")] == [1680, 240, 480]  # 70/10/20% of 2,400
    c = load_frames(config_from_dict({**raw, "data": {**raw["data"], "split_seed": 1}}))
    assert not c["valid"].equals(a["valid"]) and len(c["valid"]) == 240


def test_a_single_file_gets_a_test_split_and_streaming_prepare_gets_the_same_rows(base_config, write_config):
    raw = _one_file(base_config, test_split=0.2)
    assert main(["prepare", str(write_config(raw))]) == 0  # the streaming pass writes the cache fit reads
    assert main(["fit", str(write_config(raw, "fit.yaml"))]) == 0
    run = Path(raw["run_dir"])
    metrics = json.loads((run / "metrics.json").read_text())
    valid = json.loads((run / "metrics_valid.json").read_text())
    assert metrics["split"] == "test" and metrics["rows"] == 480 and "note" not in metrics
    assert valid["rows"] == 240  # the in-memory split's counts (test above)


def test_metrics_of_the_split_that_chose_the_checkpoint_say_so(base_config, write_config, capsys):
    raw = _one_file(base_config)
    assert main(["fit", str(write_config(raw))]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out[captured.out.index("{") : captured.out.rindex("}") + 1])
    assert summary["split"] == "valid" and summary["note"] == VALID_ONLY
    metrics = json.loads((Path(raw["run_dir"]) / "metrics.json").read_text())
    assert metrics["note"] == VALID_ONLY and metrics["rows"] == 240
    assert f"metrics.json: {VALID_ONLY}" in captured.err


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"test_split": 0.2, "test": "t.csv"}, "data.test_split: the test split is the file data.test"),
        ({"test_split": 0.95}, "valid_split + test_split = 1.05 leaves no train rows"),
        ({"test_split": 0}, "test_split must lie in (0, 1)"),
        ({"split_by": "usr_id"}, "data.split_by: the train data has no column 'usr_id'"),
    ],
)
def test_bad_split_settings_exit_2_naming_the_key(base_config, write_config, capsys, data, message):
    raw = _one_file(base_config, **data)
    assert main(["fit", str(write_config(raw))]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_compare_trains_every_seed_and_model_on_the_same_rows(base_config, write_config, tmp_path):
    raw = _one_file(base_config, test_split=0.2)
    out = tmp_path / "cmp"
    assert main(["compare", str(write_config(raw)), "--models", "esmm,base", "--seeds", "2", "--out", str(out)]) == 0
    rows = set()
    for metrics in out.rglob("metrics.json"):
        m = json.loads(metrics.read_text())
        v = json.loads((metrics.parent / "metrics_valid.json").read_text())
        rows.add((m["rows"], v["rows"], m["split"]))
    assert rows == {(480, 240, "test")}
