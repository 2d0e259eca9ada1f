"""Read and write CSV / Parquet tables, choosing the format by file extension."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Self
from pathlib import Path

import pandas as pd

from funnel.errors import DataError, UserError
from funnel.spec.schema import CsvSpec

log = logging.getLogger(__name__)

DATA_ENV = "FUNNEL_DATA_DIR"  # overrides where ${data_dir} points (default ../shared/data)
PARQUET_EXT = (".parquet", ".pq")


def default_data_dir() -> Path:
    """Where shared public datasets live: $FUNNEL_DATA_DIR, else ../shared/data beside the project."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env)
    here = Path(__file__).resolve().parents[2]  # the project root
    return here.parent / "shared" / "data"


def resolve_path(path: str) -> Path:
    """Expand ``${data_dir}`` (see :func:`default_data_dir`), ``~`` and environment variables."""
    text = path.replace("${data_dir}", str(default_data_dir()))
    return Path(os.path.expandvars(os.path.expanduser(text)))


def _require_pyarrow(path: Path) -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise UserError(
            f"{path}: reading or writing Parquet needs pyarrow. Install it with: pip install 'funnel[parquet]'"
        ) from None


def read_table(path: str | Path, csv: CsvSpec | None = None, columns: list[str] | None = None) -> pd.DataFrame:
    path = resolve_path(str(path))
    if not path.is_file():
        hint = f" (set {DATA_ENV} to the folder that holds the shared datasets)" if "shared" in str(path) else ""
        raise DataError(f"data file {str(path)!r} does not exist{hint}.")
    if path.suffix.lower() in PARQUET_EXT:
        _require_pyarrow(path)
        return pd.read_parquet(path, columns=columns)
    csv = csv or CsvSpec()
    try:
        return pd.read_csv(
            path,
            sep=csv.sep,
            header=0 if csv.header else None,
            names=list(csv.names) if csv.names else None,
            skipinitialspace=csv.skipinitialspace,
            na_values=list(csv.na_values) or None,
            usecols=columns,
            comment=csv.comment,
            low_memory=False,
        )
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path}: cannot be read as CSV ({exc}). Check data.csv (sep, header, names).") from None


def table_columns(path: str | Path, csv: CsvSpec | None = None) -> list[str]:
    """The column names of a CSV or Parquet file, without reading its rows."""
    path = resolve_path(str(path))
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist.")
    if path.suffix.lower() in PARQUET_EXT:
        _require_pyarrow(path)
        import pyarrow.parquet as pq

        return list(pq.ParquetFile(path).schema_arrow.names)
    csv = csv or CsvSpec()
    if csv.names:
        return list(csv.names)
    try:
        return [str(c) for c in pd.read_csv(path, sep=csv.sep, nrows=0, skipinitialspace=csv.skipinitialspace,
                                            comment=csv.comment).columns]
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path}: cannot be read as CSV ({exc}). Check data.csv (sep, header, names).") from None


def iter_table(path: str | Path, csv: CsvSpec | None = None, columns: list[str] | None = None,
               chunk_rows: int = 262_144) -> Iterator[pd.DataFrame]:
    """The table in chunks of at most ``chunk_rows`` rows, so memory stays flat for any file size."""
    path = resolve_path(str(path))
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist.")
    if path.suffix.lower() in PARQUET_EXT:
        _require_pyarrow(path)
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=chunk_rows, columns=columns):
            yield batch.to_pandas()
        return
    csv = csv or CsvSpec()
    try:
        reader = pd.read_csv(
            path, sep=csv.sep, header=0 if csv.header else None, names=list(csv.names) if csv.names else None,
            skipinitialspace=csv.skipinitialspace, na_values=list(csv.na_values) or None, usecols=columns,
            comment=csv.comment, chunksize=chunk_rows, low_memory=False,
        )
        with reader:
            yield from reader
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path}: cannot be read as CSV ({exc}). Check data.csv (sep, header, names).") from None


class TableWriter:
    """Append DataFrames to one CSV or Parquet file (by extension), chunk by chunk."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.parquet = self.path.suffix.lower() in PARQUET_EXT
        self.rows = 0
        self._writer = None
        if self.parquet:
            _require_pyarrow(self.path)

    def write(self, df: pd.DataFrame) -> None:
        if self.parquet:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pandas(df, preserve_index=False)
            if self._writer is None:
                self._writer = pq.ParquetWriter(self.path, table.schema)
            self._writer.write_table(table)
        else:
            df.to_csv(self.path, index=False, mode="w" if self.rows == 0 else "a", header=self.rows == 0,
                      float_format="%.7g")
        self.rows += len(df)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        elif self.rows == 0 and not self.parquet:
            self.path.write_text("")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_table(df: pd.DataFrame, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in PARQUET_EXT:
        _require_pyarrow(path)
        df.to_parquet(path, index=False)
    else:
        df.to_csv(path, index=False)
    return path
