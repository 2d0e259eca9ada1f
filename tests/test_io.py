"""The CSV / Parquet writer used by `funnel predict`: chunks appended in order, values read back exactly."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest

from funnel.data.io import TableWriter


def chunks() -> list[pd.DataFrame]:
    rng = np.random.default_rng(3)
    return [
        pd.DataFrame(
            {
                "user": ["a,b", 'say "hi"', "line\nbreak"],  # a --keep column that needs quoting
                "n": [1, 2, 3],
                "p": rng.random(3).astype(np.float32),
                "q": [0.5, np.nan, 1e-7],
            }
        ),
        pd.DataFrame(
            {"user": ["plain", "", "z"], "n": [4, 5, 6], "p": np.float32([0.1, 0.2, 1 / 3]), "q": [1.0, 2.0, 3.0]}
        ),
    ]


def write(path, parts) -> pd.DataFrame:
    with TableWriter(path) as writer:
        for part in parts:
            writer.write(part)
    assert writer.rows == sum(len(p) for p in parts)
    return pd.read_csv(path, keep_default_na=False, na_values=[""]) if path.suffix == ".csv" else pd.read_parquet(path)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_chunks_are_appended_in_order_and_read_back_exactly(tmp_path, suffix):
    parts = chunks()
    back = write(tmp_path / f"out{suffix}", parts)
    expected = pd.concat(parts, ignore_index=True)
    assert list(back.columns) == ["user", "n", "p", "q"]
    assert back["n"].tolist() == [1, 2, 3, 4, 5, 6]
    assert back["user"].fillna("").tolist() == expected["user"].tolist()
    # float32 predictions are written with enough digits to read back to the same float32
    np.testing.assert_array_equal(back["p"].to_numpy(np.float32), expected["p"].to_numpy())
    np.testing.assert_array_equal(back["q"].to_numpy(), expected["q"].to_numpy())


def test_csv_header_is_plain_and_numbers_are_unquoted(tmp_path):
    path = tmp_path / "out.csv"
    write(path, chunks()[1:])
    lines = path.read_text().splitlines()
    assert lines[0] == "user,n,p,q"
    assert lines[1] == '"plain",4,0.1,1'  # arrow quotes every string value


def test_csv_without_pyarrow_writes_the_same_table(tmp_path, monkeypatch):
    fast = write(tmp_path / "fast.csv", chunks())
    monkeypatch.setitem(sys.modules, "pyarrow.csv", None)  # import fails: the pandas writer takes over
    slow = write(tmp_path / "slow.csv", chunks())
    pd.testing.assert_frame_equal(fast, slow)


def test_an_empty_prediction_leaves_an_empty_file(tmp_path):
    path = tmp_path / "none.csv"
    with TableWriter(path):
        pass
    assert path.read_text() == ""


def test_prefetched_keeps_the_order_and_reads_one_chunk_ahead():
    import threading

    from funnel.data.io import prefetched

    reads: list[int] = []

    def source():
        for k in range(5):
            reads.append(k)
            yield k

    seen = []
    for item in prefetched(source()):
        seen.append(item)
        assert len(reads) <= item + 2  # never more than one chunk ahead
    assert seen == [0, 1, 2, 3, 4]
    assert list(prefetched(iter([]))) == []
    assert not [t for t in threading.enumerate() if t.name.startswith("funnel-read")]  # the reader is gone


def test_prefetched_raises_the_readers_error_in_the_caller():
    from funnel.data.io import prefetched
    from funnel.errors import DataError

    def source():
        yield 1
        raise DataError("bad row 7")

    got = prefetched(source())
    assert next(got) == 1
    with pytest.raises(DataError, match="bad row 7"):
        next(got)
