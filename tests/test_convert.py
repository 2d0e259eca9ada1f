"""`funnel convert`: raw Ali-CCP and PaddleRec ESMM text to Parquet shards, on files written by hand here
from the format description, on the shared PaddleRec sample, and end to end through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from funnel.convert import convert_aliccp, convert_paddlerec, parse_inputs, resolve_fields
from funnel.data.aliccp import FIELDS
from funnel.data.field_lists import FieldLists, group_by_field
from funnel.errors import DataError, UserError
from funnel.spec.schema import FEATURE_OPTIONS
from tests.test_cli import run_cli

ROOT = Path(__file__).resolve().parents[1]
PADDLEREC = ROOT.parent / "shared" / "data" / "ali-ccp-samples" / "paddlerec-esmm"


def feats(*items: tuple[str, int | str, float | str]) -> str:
    """A raw feature_list: field \\x02 feat_id \\x03 value, joined by \\x01."""
    return "\x01".join(f"{f}\x02{i}\x03{v}" for f, i, v in items)


# two users in the common features; user A has a field with two ids and values, and an unknown field
COMMON = [
    f"aaaa,4,{feats(('101', 11, '1.0'), ('109_14', 501, '0.5'), ('109_14', 502, '2.0'), ('999', 1, '1.0'))}",
    f"bbbb,3,{feats(('101', 12, '1.0'), ('121', 7, '1.0'), ('210', 900, '1.0'))}",  # and an ad field
]
SKELETON = [
    f"1,0,0,aaaa,2,{feats(('205', 100, '1.0'), ('210', 301, '1.0'))}",
    f"2,1,1,bbbb,3,{feats(('205', 101, '1.0'), ('210', 302, '1.0'), ('210', 303, '0.5'))}",
    f"3,0,1,cccc,1,{feats(('205', 102, '1.0'))}",  # md5 not in the common features; purchase without click
    f"4,1,0,aaaa,2,{feats(('205', 100, '1.0'), ('888', 5, '1.0'))}",  # an unknown field
    "5,0,0,aaaa,0,",  # no ad features
]


def write_raw(folder: Path, skeleton=SKELETON, common=COMMON, splits=("train", "test")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split in splits:
        (folder / f"sample_skeleton_{split}.csv").write_text("\n".join(skeleton) + "\n")
        (folder / f"common_features_{split}.csv").write_text("\n".join(common) + "\n")
    return folder


def rows(folder: Path) -> list[dict]:
    return pq.read_table(folder).to_pylist()


def test_ragged_take_gathers_rows_and_gives_empty_lists_for_minus_one():
    r = FieldLists(np.array([0, 2, 2, 3]), np.array([5, 6, 7]), np.array([0.5, 1.0, 2.0], np.float32))
    out = r.take(np.array([2, -1, 0, 0]))
    assert out.offsets.tolist() == [0, 1, 1, 3, 5]
    assert out.ids.tolist() == [7, 5, 6, 5, 6]
    assert out.weights.tolist() == [2.0, 0.5, 1.0, 0.5, 1.0]


def test_ragged_concat_rows_keeps_each_rows_own_ids_first():
    a = FieldLists(np.array([0, 1, 1, 3]), np.array([1, 2, 3]), np.ones(3, np.float32))
    b = FieldLists(np.array([0, 0, 2, 3]), np.array([8, 9, 10]), np.full(3, 2.0, np.float32))
    out = a.concat_rows(b)
    assert out.offsets.tolist() == [0, 1, 3, 6]
    assert out.ids.tolist() == [1, 8, 9, 2, 3, 10]
    assert out.weights.tolist() == [1, 2, 2, 1, 1, 2]


def test_group_by_field_keeps_line_order_and_drops_unknown_codes():
    lists = group_by_field(
        rows=np.array([0, 0, 0, 2, 2]),
        codes=np.array([1, 0, 1, -1, 1]),
        ids=np.array([10, 20, 30, 40, 50]),
        weights=np.ones(5, np.float32),
        n_rows=3,
        n_fields=2,
    )
    assert lists[0].offsets.tolist() == [0, 1, 1, 1] and lists[0].ids.tolist() == [20]
    assert lists[1].offsets.tolist() == [0, 2, 2, 3] and lists[1].ids.tolist() == [10, 30, 50]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, dict]:
    base = tmp_path_factory.mktemp("aliccp")
    raw = write_raw(base / "raw")
    return base / "out", convert_aliccp(raw, base / "out", shard_rows=3, chunk_rows=2)


def test_aliccp_joins_user_and_ad_fields_into_exact_lists(converted):
    out, _ = converted
    got = rows(out / "train")
    assert [r["sample_id"] for r in got] == [1, 2, 3, 4, 5]
    assert [(r["click"], r["purchase"]) for r in got] == [(0, 0), (1, 1), (0, 1), (1, 0), (0, 0)]
    first = got[0]
    assert (first["101"], first["w_101"]) == ([11], [1.0])
    assert (first["109_14"], first["w_109_14"]) == ([501, 502], [0.5, 2.0])
    assert (first["205"], first["210"]) == ([100], [301])
    assert first["121"] == [] and first["w_121"] == [] and first["301"] == []
    assert (got[1]["101"], got[1]["121"]) == ([12], [7])
    # a field in both files: the impression's own ids first, then the user's
    assert (got[1]["210"], got[1]["w_210"]) == ([302, 303, 900], [1.0, 0.5, 1.0])
    # md5 missing from the common features: kept, with every user field empty
    assert all(got[2][f] == [] for f in ("101", "121", "109_14")) and got[2]["205"] == [102]
    assert got[3]["109_14"] == [501, 502] and got[3]["210"] == []
    assert got[4]["205"] == [] and got[4]["101"] == [11]


def test_aliccp_writes_the_fields_in_order_with_their_types(converted):
    out, _ = converted
    schema = pq.read_schema(out / "train" / "part-00000.parquet")
    assert schema.names[:5] == ["sample_id", "click", "purchase", "101", "w_101"]
    assert schema.names[3::2] == list(FIELDS) and len(schema.names) == 3 + 2 * 23
    assert (schema.field("sample_id").type, schema.field("click").type) == (pa.int64(), pa.int8())
    assert [schema.field(n).type.value_type for n in ("101", "w_101")] == [pa.int64(), pa.float32()]


def test_aliccp_shards_every_shard_rows_rows(converted):
    out, report = converted
    assert sorted(p.name for p in (out / "train").iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    shards = ("part-00000.parquet", "part-00001.parquet")
    assert [pq.read_metadata(out / "train" / p).num_rows for p in shards] == [3, 2]
    assert report["splits"]["train"]["shards"] == 2
    assert not list(out.glob(".tmp-*"))


def test_aliccp_report_counts_labels_gaps_and_unknown_fields(converted):
    out, report = converted
    assert json.loads((out / "convert.json").read_text()) == report
    train = report["splits"]["train"]
    assert (train["rows"], train["clicks"], train["purchases"]) == (5, 2, 2)
    assert train["purchases_without_click"] == 1
    assert train["missing_common_features"] == 1
    assert train["skeleton"]["unknown_fields"] == {"888": 1}
    assert train["common_features"]["unknown_fields"] == {"999": 1}
    assert train["common_features"]["keys"] == 2 and train["skeleton"]["malformed_lines"] == 0
    assert train["fields"]["109_14"] == {"ids": 6, "rows_with_ids": 3, "max_ids": 2}
    assert train["fields"]["210"] == {"ids": 4, "rows_with_ids": 2, "max_ids": 3}
    assert set(report["splits"]) == {"train", "test"}


def test_aliccp_fields_all_keeps_the_unknown_fields_and_a_list_picks_some(tmp_path):
    raw = write_raw(tmp_path / "raw", splits=("train",))
    report = convert_aliccp(raw, tmp_path / "all", splits="train", fields="all")
    assert report["fields"][-2:] == ["888", "999"]
    got = rows(tmp_path / "all" / "train")
    assert got[3]["888"] == [5] and got[0]["999"] == [1] and got[1]["999"] == []
    convert_aliccp(raw, tmp_path / "two", splits="train", fields="205,109_14")
    assert pq.read_schema(tmp_path / "two" / "train" / "part-00000.parquet").names[3:] == [
        "205",
        "w_205",
        "109_14",
        "w_109_14",
    ]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("9,0,0,aaaa,1", "has 5 comma-separated columns, expected 6"),
        (f"9,2,0,aaaa,1,{feats(('205', 1, '1.0'))}", "click is '2', expected 0 or 1"),
        ("9,0,0,aaaa,1,205\x02100", "feature '205\\x02100' is not field\\x02feat_id\\x03value"),
        (f"9,0,0,aaaa,1,{feats(('205', 'abc', '1.0'))}", "feature id 'abc' is not an integer"),
        (f"9,0,0,aaaa,1,{feats(('205', 1, 'x'))}", "feature value 'x' is not a number"),
        (f"x9,0,0,aaaa,1,{feats(('205', 1, '1.0'))}", "sample_id 'x9' is not an integer"),
    ],
)
def test_a_malformed_line_stops_naming_file_line_and_problem(tmp_path, line, problem):
    # a blank line first: it is skipped (and counted) without shifting the line numbers
    raw = write_raw(tmp_path / "raw", skeleton=[SKELETON[0], "", SKELETON[1], line], splits=("train",))
    with pytest.raises(DataError) as err:
        convert_aliccp(raw, tmp_path / "out", splits="train", chunk_rows=2)
    assert "sample_skeleton_train.csv, line 4: " + problem in str(err.value)
    assert "--skip-bad" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_the_first_malformed_line_is_named_whichever_check_finds_it(tmp_path):
    # line 1: a bad click (checked after sample_id); lines 2-8: a bad sample_id each
    lines = [f"1,2,0,aaaa,1,{feats(('205', 1, '1.0'))}"] + [f"x{k},0,0,aaaa,1," for k in range(7)]
    raw = write_raw(tmp_path / "raw", skeleton=lines, splits=("train",))
    with pytest.raises(DataError, match="line 1: click is '2'"):
        convert_aliccp(raw, tmp_path / "out", splits="train")


def test_skip_bad_drops_and_counts_malformed_lines(tmp_path):
    bad = ["9,0,0,aaaa,1", f"10,0,0,aaaa,1,{feats(('205', 'abc', '1.0'))}"]
    raw = write_raw(tmp_path / "raw", skeleton=[SKELETON[0], *bad, SKELETON[1], ""], splits=("train",))
    report = convert_aliccp(raw, tmp_path / "out", splits="train", skip_bad=True, chunk_rows=2)
    assert [r["sample_id"] for r in rows(tmp_path / "out" / "train")] == [1, 2]
    skeleton = report["splits"]["train"]["skeleton"]
    assert (skeleton["malformed_lines"], skeleton["blank_lines"], skeleton["lines"]) == (2, 1, 2)
    assert [e["line"] for e in skeleton["malformed_examples"]] == [2, 3]


def test_feature_num_disagreeing_with_the_features_is_counted_not_dropped(tmp_path):
    raw = write_raw(tmp_path / "raw", skeleton=[f"1,0,0,aaaa,5,{feats(('205', 1, '1.0'))}"], splits=("train",))
    report = convert_aliccp(raw, tmp_path / "out", splits="train")
    assert report["splits"]["train"]["skeleton"]["feature_num_mismatch"] == 1
    assert rows(tmp_path / "out" / "train")[0]["205"] == [1]


def test_a_failing_later_split_leaves_no_earlier_one_behind(tmp_path):
    raw = write_raw(tmp_path / "raw")
    (raw / "sample_skeleton_test.csv").write_text("1,0,0,aaaa\n")
    (tmp_path / "out").mkdir()  # an existing empty OUT_DIR stays, empty
    with pytest.raises(DataError, match="sample_skeleton_test.csv, line 1"):
        convert_aliccp(raw, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize(
    ("fields", "message"), [("205,w_1", "'w_1' cannot name a field"), ("205,205", "205 listed more than once")]
)
def test_bad_fields_are_refused(fields, message):
    with pytest.raises(UserError, match=message):
        resolve_fields(fields)


def test_paddlerec_hand_written_lines(tmp_path):
    (tmp_path / "a.txt").write_text("7,1,0,205:3,210:4,210:5,999:1\n8,0,0,101:9\n")
    report = convert_paddlerec([f"test={tmp_path / 'a.txt'}"], tmp_path / "out")
    got = rows(tmp_path / "out" / "test")
    assert [(r["sample_id"], r["click"], r["purchase"]) for r in got] == [(7, 1, 0), (8, 0, 0)]
    assert (got[0]["205"], got[0]["210"], got[0]["w_210"]) == ([3], [4, 5], [1.0, 1.0])
    assert got[0]["101"] == [] and got[1]["101"] == [9]
    assert report["splits"]["test"]["files"][0]["unknown_fields"] == {"999": 1}


def test_paddlerec_malformed_item_names_its_line(tmp_path):
    (tmp_path / "a.txt").write_text("7,1,0,205:3\n8,0,0,205-9\n")
    with pytest.raises(DataError, match=r"a.txt, line 2: item '205-9' is not field:feat_id"):
        convert_paddlerec([str(tmp_path / "a.txt")], tmp_path / "out")


def _hand_parse(line: str) -> tuple[list[int], dict[str, list[int]]]:
    parts = line.strip().split(",")
    fields: dict[str, list[int]] = {}
    for item in parts[3:]:
        name, feat = item.split(":")
        fields.setdefault(name, []).append(int(feat))
    return [int(p) for p in parts[:3]], fields


@pytest.fixture(scope="module")
def paddlerec_sample(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("paddlerec") / "out"
    convert_paddlerec([f"train={PADDLEREC / 'train_small.txt'}", f"test={PADDLEREC / 'test_small.txt'}"], out)
    return out


@pytest.mark.parametrize("split", ["train", "test"])
def test_paddlerec_shared_sample_matches_a_hand_parse(paddlerec_sample, split):
    lines = (PADDLEREC / f"{split}_small.txt").read_text().splitlines()
    got = rows(paddlerec_sample / split)
    assert len(got) == 10
    assert [[r["sample_id"], r["click"], r["purchase"]] for r in got] == [_hand_parse(li)[0] for li in lines]
    _, fields = _hand_parse(lines[0])
    assert {f: got[0][f] for f in FIELDS if got[0][f]} == fields
    assert len(got[0]["110_14"]) == 342 and set(got[0]["w_110_14"]) == {1.0}


def test_parse_inputs_reads_split_prefixes_and_folders(tmp_path):
    (tmp_path / "d").mkdir()
    for name in ("b.txt", "a.txt", ".hidden"):
        (tmp_path / "d" / name).write_text("1,0,0\n")
    (tmp_path / "dt=1").write_text("1,0,0\n")
    got = parse_inputs([f"valid={tmp_path / 'd'}", str(tmp_path / "dt=1")])
    assert got == {"valid": [tmp_path / "d" / "a.txt", tmp_path / "d" / "b.txt"], "train": [tmp_path / "dt=1"]}


# --- the command line ---------------------------------------------------------------------------


def assert_one_error_line(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    for fragment in fragments:
        assert fragment in err


def test_cli_converts_and_prints_the_counts_then_the_folder(tmp_path):
    raw = write_raw(tmp_path / "raw")
    code, out, err = run_cli(["convert", "ali-ccp", str(raw), str(tmp_path / "out"), "--shard-rows", "2"])
    assert code == 0, err
    assert out.splitlines()[-1] == f"converted data: {tmp_path / 'out'}"
    assert json.loads(out.rsplit("\n", 2)[0])["train"] == {"rows": 5, "clicks": 2, "purchases": 2}
    assert len(list((tmp_path / "out" / "test").glob("part-*.parquet"))) == 3
    assert "train: done, 5 rows" in err and "purchases without a click" in err


def test_python_m_funnel_convert_paddlerec(tmp_path):
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "funnel",
        "-q",
        "convert",
        "paddlerec-esmm",
        str(PADDLEREC / "train_small.txt"),
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert pq.read_metadata(out / "train" / "part-00000.parquet").num_rows == 10


@pytest.mark.parametrize(
    ("case", "fragments"),
    [
        ("missing_raw_dir", ["RAW_DIR", "is not a folder"]),
        ("missing_file", ["common_features_test.csv not found", "Unpack"]),
        ("non_empty_out_dir", ["is not empty; remove it or choose another folder"]),
        ("malformed_line", ["sample_skeleton_train.csv, line 2", "--skip-bad"]),
        ("bad_shard_rows", ["--shard-rows must be >= 1"]),
        ("bad_split", ["--splits: 'valid' is not a split of Ali-CCP"]),
    ],
)
def test_cli_bad_input_exits_2_with_one_error_line_and_leaves_nothing(tmp_path, case, fragments):
    raw, out = write_raw(tmp_path / "raw"), tmp_path / "out"
    extra = []
    if case == "missing_raw_dir":
        raw = tmp_path / "nowhere"
    elif case == "missing_file":
        (raw / "common_features_test.csv").unlink()
    elif case == "non_empty_out_dir":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "malformed_line":
        (raw / "sample_skeleton_train.csv").write_text(SKELETON[0] + "\n1,0,0\n")
    elif case == "bad_shard_rows":
        extra = ["--shard-rows", "0"]
    elif case == "bad_split":
        extra = ["--splits", "train,valid"]
    code, _, err = run_cli(["convert", "ali-ccp", str(raw), str(out), *extra])
    assert_one_error_line(code, err, *fragments)
    if case == "non_empty_out_dir":
        assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    else:
        assert not out.exists()


def test_cli_paddlerec_missing_input_exits_2(tmp_path):
    code, _, err = run_cli(["convert", "paddlerec-esmm", f"tset={tmp_path / 'x.txt'}", str(tmp_path / "out")])
    assert_one_error_line(code, err, "does not exist", 'Did you mean "test"?')
    assert not (tmp_path / "out").exists()


# --- the shipped config on a tiny converted copy ---------------------------------------------------


@pytest.mark.skipif("multi_hot" not in FEATURE_OPTIONS, reason="needs the multi_hot feature kind")
def test_the_aliccp_config_checks_and_fits_on_the_converted_sample(paddlerec_sample, tmp_path):
    data = [f"data.train={paddlerec_sample / 'train'}", f"data.test={paddlerec_sample / 'test'}"]
    code, out, err = run_cli(["check", str(ROOT / "configs" / "esmm_aliccp.yaml"), *data])
    assert code == 0, err
    assert "config and data OK" in out
    trainer = ["trainer.max_epochs=1", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1"]
    args = ["fit", str(ROOT / "configs" / "esmm_aliccp.yaml"), *data, *trainer, f"run_dir={tmp_path / 'run'}"]
    code, out, err = run_cli(args)
    assert code == 0, err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["rows"] == 10
