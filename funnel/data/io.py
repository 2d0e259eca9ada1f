"""Read and write CSV / Parquet tables, choosing the format by file extension."""

from __future__ import annotations

import logging
import os
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


def write_table(df: pd.DataFrame, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in PARQUET_EXT:
        _require_pyarrow(path)
        df.to_parquet(path, index=False)
    else:
        df.to_csv(path, index=False)
    return path
