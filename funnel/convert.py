"""`funnel convert`: the raw Ali-CCP release, or PaddleRec's ESMM text, to Parquet shards.

OUT_DIR after a conversion:

    train/part-00000.parquet ...   sample_id int64, click int8, purchase int8, and for each field F:
    test/part-00000.parquet ...      F list<int64> (its feature ids), w_F list<float32> (their values)
    convert.json                   per split: rows, clicks, purchases, malformed lines, unknown fields

Everything is written under OUT_DIR/.tmp-* first; the split folders are renamed into place only when
every split is complete, so a failure or Ctrl-C leaves OUT_DIR as it was (a folder made for it is
removed again). Lines are read, parsed, joined and written in blocks: memory stays flat in the size
of the input.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from funnel.atomic import write_text
from funnel.data import aliccp, paddlerec
from funnel.data.field_lists import FieldLists
from funnel.errors import DataError, UserError, did_you_mean

log = logging.getLogger(__name__)

FORMATS = ("ali-ccp", "paddlerec-esmm")
ALICCP_SPLITS = ("train", "test")
SPLITS = ("train", "valid", "test")
DEFAULT_SHARD_ROWS = 1_000_000
# rows joined and written at a time (one Parquet row group): at Ali-CCP's ~860 ids a row, ~1 GB of work memory
CHUNK_ROWS = 32_768
PROGRESS_ROWS = 1_000_000
RESERVED = ("sample_id", *aliccp.LABELS)


def _require_pyarrow() -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise UserError("funnel convert writes Parquet, which needs pyarrow: pip install 'funnel[parquet]'") from None


def resolve_fields(fields: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """The fields to convert: "default" (the 23 documented ones), "all" (None: every field found, which
    costs one extra read of the input), or a comma-separated list / sequence of field ids."""
    if fields is None or fields == "default":
        return aliccp.FIELDS
    if fields == "all":
        return None
    names = [f.strip() for f in fields.split(",")] if isinstance(fields, str) else [str(f) for f in fields]
    problems = []
    for name in names:
        if not name or name.startswith("w_") or name in RESERVED:
            problems.append(
                f"--fields: {name!r} cannot name a field (empty, or the name of another column). "
                f"Give field ids such as {','.join(aliccp.FIELDS[:3])}, or default, or all."
            )
    if dupes := sorted(k for k, v in Counter(names).items() if v > 1):
        problems.append(f"--fields: {', '.join(dupes)} listed more than once.")
    if problems:
        raise UserError(problems)
    return tuple(names)


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"OUT_DIR {str(out_dir)!r} is a file; give a folder to write the shards to.")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise UserError(
            f"OUT_DIR {str(out_dir)!r} is not empty; remove it or choose another folder (funnel convert "
            "never writes over earlier output)."
        )


@contextlib.contextmanager
def _staged(out_dir: Path) -> Iterator[Path]:
    """A temporary folder inside ``out_dir``; on failure it is removed, and so is ``out_dir`` if made here."""
    made = next((p for p in reversed([out_dir, *out_dir.parents]) if not p.exists()), None)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out_dir))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        raise
    shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, out_dir: Path, report: dict) -> None:
    for split in report["splits"]:
        os.replace(tmp / split, out_dir / split)
    write_text(out_dir / "convert.json", json.dumps(report, indent=1) + "\n")


class _ShardWriter:
    """Appends tables to ``folder``/part-NNNNN.parquet, starting a new file every ``shard_rows`` rows.

    Parquet encoding of long lists is the slowest step (over half of a conversion), so it runs in a
    background thread (Arrow releases the GIL) while the next block is parsed; one block waits at most."""

    def __init__(self, folder: Path, schema, shard_rows: int):
        self.folder, self.schema, self.shard_rows = folder, schema, shard_rows
        folder.mkdir()
        self.files: list[Path] = []
        self._writer = None
        self._rows = 0  # in the open shard
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="funnel-convert")
        self._pending: Future | None = None

    def _open(self) -> None:
        import pyarrow.parquet as pq

        path = self.folder / f"part-{len(self.files):05d}.parquet"
        self.files.append(path)
        # zstd: 25% smaller than snappy here; dictionaries only help the short fields and cost 30% more time
        self._writer = pq.ParquetWriter(path, self.schema, compression="zstd", use_dictionary=False)
        self._rows = 0

    def _write(self, table) -> None:
        while table.num_rows:
            if self._writer is None:
                self._open()
            head = table.slice(0, self.shard_rows - self._rows)
            self._writer.write_table(head, row_group_size=head.num_rows)
            self._rows += head.num_rows
            table = table.slice(head.num_rows)
            if self._rows == self.shard_rows:
                self._writer.close()
                self._writer = None

    def write(self, table) -> None:
        self._wait()
        self._pending = self._pool.submit(self._write, table)

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()  # re-raises the writer's error here

    def __enter__(self) -> _ShardWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        try:
            if exc_type is None:
                self._wait()
                if not self.files:  # an empty split still gets one (empty) shard: its schema
                    self._open()
            elif self._pending is not None:
                self._pending.exception()  # let the write in flight finish before closing its file
        finally:
            self._pool.shutdown()
            if self._writer is not None:
                self._writer.close()
                self._writer = None


class _Progress:
    """Logs ``label: N rows (R rows/s)`` every ``every`` rows and at the end."""

    def __init__(self, label: str, every: int):
        self.label, self.every = label, every
        self.start = time.perf_counter()
        self.rows = 0

    def __call__(self, rows: int) -> None:
        if rows // self.every > self.rows // self.every:
            log.info("%s: %s rows (%s rows/s)", self.label, f"{rows:,}", f"{rows / self._elapsed():,.0f}")
        self.rows = rows

    def _elapsed(self) -> float:
        return max(time.perf_counter() - self.start, 1e-9)

    def done(self) -> float:
        rate = self.rows / self._elapsed()
        log.info(
            "%s: done, %s rows in %.1f s (%s rows/s)", self.label, f"{self.rows:,}", self._elapsed(), f"{rate:,.0f}"
        )
        return rate


class _SplitStats:
    """The counts that go into convert.json for one split."""

    def __init__(self, fields: Sequence[str]):
        self.fields = fields
        self.rows = self.clicks = self.purchases = self.purchases_without_click = self.missing_common = 0
        self.ids = np.zeros(len(fields), np.int64)
        self.rows_with = np.zeros(len(fields), np.int64)
        self.max_ids = np.zeros(len(fields), np.int64)

    def add(self, parsed: aliccp.Parsed, lists: Sequence[FieldLists]) -> None:
        self.rows += parsed.n
        self.clicks += int(parsed.click.sum())
        self.purchases += int(parsed.purchase.sum())
        self.purchases_without_click += int(((parsed.purchase == 1) & (parsed.click == 0)).sum())
        for k, ragged in enumerate(lists):
            lengths = ragged.lengths()
            self.ids[k] += len(ragged.ids)
            self.rows_with[k] += int((lengths > 0).sum())
            self.max_ids[k] = max(self.max_ids[k], int(lengths.max(initial=0)))

    def as_dict(self) -> dict:
        return {
            "rows": self.rows,
            "clicks": self.clicks,
            "purchases": self.purchases,
            "purchases_without_click": self.purchases_without_click,
            "fields": {
                name: {
                    "ids": int(self.ids[k]),
                    "rows_with_ids": int(self.rows_with[k]),
                    "max_ids": int(self.max_ids[k]),
                }
                for k, name in enumerate(self.fields)
            },
        }


def _warn(split: str, stats: dict, reports: Sequence[aliccp.FileReport]) -> None:
    """Say, once per split, what was counted rather than converted as is."""
    for r in reports:
        if r.unknown_fields:
            log.warning(
                "%s: %s features of fields not converted (%s); pass --fields all to keep them",
                r.path,
                f"{sum(r.unknown_fields.values()):,}",
                ", ".join(f"{k}: {v:,}" for k, v in sorted(r.unknown_fields.items())),
            )
    for r in reports:
        if r.malformed:
            log.warning("%s: skipped %s malformed lines (--skip-bad); see convert.json", r.path, f"{r.malformed:,}")
        if r.feature_num_mismatch:
            log.warning("%s: %s lines whose feature_num differs from their features", r.path, r.feature_num_mismatch)
    if stats["purchases_without_click"]:
        log.warning("%s: %s purchases without a click (kept as is)", split, f"{stats['purchases_without_click']:,}")
    if stats.get("missing_common_features"):
        log.warning(
            "%s: %s impressions whose md5 is not in the common features: their user fields are empty",
            split,
            f"{stats['missing_common_features']:,}",
        )


def _discover(paths_and_parsers, skip_bad: bool) -> tuple[str, ...]:
    """``--fields all``: the documented fields plus every other field found (one extra read of the input)."""
    found: Counter = Counter()
    for path, parse in paths_and_parsers:
        report = aliccp.FileReport(str(path))
        for _ in aliccp.iter_parsed(path, lambda lines, p=parse: p(lines, ()), report, skip_bad):
            pass
        found.update(report.unknown_fields)
    extra = sorted(set(found) - set(aliccp.FIELDS))
    if extra:
        log.info("--fields all: %d fields beyond the documented ones: %s", len(extra), ", ".join(extra))
    return aliccp.FIELDS + tuple(extra)


def _check_shard_rows(shard_rows: int) -> None:
    if shard_rows < 1:
        raise UserError(f"--shard-rows must be >= 1, got {shard_rows}.")


def convert_aliccp(
    raw_dir: str | Path,
    out_dir: str | Path,
    splits: str | Sequence[str] = ALICCP_SPLITS,
    fields: str | Sequence[str] | None = "default",
    shard_rows: int = DEFAULT_SHARD_ROWS,
    skip_bad: bool = False,
    chunk_rows: int = CHUNK_ROWS,
    progress_rows: int = PROGRESS_ROWS,
) -> dict:
    """Convert the raw Ali-CCP release in ``raw_dir`` (sample_skeleton_S.csv joined with
    common_features_S.csv by md5, for each split S) to Parquet shards in ``out_dir``; returns the
    report also written to ``out_dir``/convert.json."""
    _require_pyarrow()
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    names = [s.strip() for s in splits.split(",")] if isinstance(splits, str) else list(splits)
    for name in names:
        if name not in ALICCP_SPLITS:
            raise UserError(f"--splits: {name!r} is not a split of Ali-CCP ({', '.join(ALICCP_SPLITS)}).")
    if not names or len(set(names)) != len(names):
        raise UserError(f"--splits: give each of {', '.join(ALICCP_SPLITS)} at most once, e.g. train,test.")
    _check_shard_rows(shard_rows)
    if not raw_dir.is_dir():
        raise UserError(f"RAW_DIR {str(raw_dir)!r} is not a folder; give the folder of the unpacked Ali-CCP files.")
    files = {s: (raw_dir / f"sample_skeleton_{s}.csv", raw_dir / f"common_features_{s}.csv") for s in names}
    missing = [p.name for pair in files.values() for p in pair if not p.is_file()]
    if missing:
        present = sorted(p.name for p in raw_dir.iterdir())[:8]
        raise DataError(
            f"{raw_dir}: {', '.join(missing)} not found (the folder holds: {', '.join(present) or 'nothing'}). "
            "Unpack the Ali-CCP archives (sample_train.tar.gz, sample_test.tar.gz) into RAW_DIR first."
        )
    selected = resolve_fields(fields)
    _check_out_dir(out_dir)
    if selected is None:
        pairs = [
            (p, parse)
            for s in names
            for p, parse in zip(files[s], (aliccp.parse_skeleton, aliccp.parse_common), strict=True)
        ]
        selected = _discover(pairs, skip_bad)
    report = {"format": "ali-ccp", "source": str(raw_dir.resolve()), "fields": list(selected), "splits": {}}
    with _staged(out_dir) as tmp:
        for split in names:
            report["splits"][split] = _aliccp_split(
                split, *files[split], tmp, selected, shard_rows, skip_bad, chunk_rows, progress_rows
            )
        _publish(tmp, out_dir, report)
    return report


def _aliccp_split(split, skeleton, common, tmp, fields, shard_rows, skip_bad, chunk_rows, progress_rows) -> dict:
    common_report = aliccp.FileReport(str(common))
    progress = _Progress(f"{common.name}", max(1, progress_rows // 10))  # ~1/100 as many lines as impressions
    store = aliccp.CommonFeatures.build(common, tmp / f"common-{split}", fields, common_report, skip_bad, progress)
    progress.done()
    skeleton_report = aliccp.FileReport(str(skeleton))
    stats, missing = _SplitStats(fields), 0
    progress = _Progress(f"{split}", progress_rows)
    parse = lambda lines: aliccp.parse_skeleton(lines, fields)  # noqa: E731
    with _ShardWriter(tmp / split, aliccp.schema(fields), shard_rows) as writer:
        for parsed in aliccp.iter_parsed(skeleton, parse, skeleton_report, skip_bad, chunk_rows):
            rows = store.lookup(parsed.key)
            missing += int((rows < 0).sum())
            lists = [own.concat_rows(user) for own, user in zip(parsed.lists, store.gather(rows), strict=True)]
            writer.write(aliccp.to_table(parsed.sample_id, parsed.click, parsed.purchase, fields, lists))
            stats.add(parsed, lists)
            progress(stats.rows)
    rate = progress.done()
    shutil.rmtree(tmp / f"common-{split}", ignore_errors=True)  # free its disk before the next split
    out = stats.as_dict()
    out.update(
        shards=len(writer.files),
        rows_per_second=round(rate),
        missing_common_features=missing,
        skeleton=skeleton_report.as_dict(),
        common_features={**common_report.as_dict(), "keys": len(store), "duplicate_keys": store.duplicates},
    )
    _warn(split, out, [skeleton_report, common_report])
    if store.duplicates:
        log.warning("%s: %s md5 keys appear more than once; the first line of each is used", common, store.duplicates)
    return out


def parse_inputs(inputs: Sequence[str]) -> dict[str, list[Path]]:
    """``[SPLIT=]PATH`` arguments -> {split: files}; PATH is a file or a folder of files (read in name
    order); SPLIT is train (the default), valid or test."""
    out: dict[str, list[Path]] = {}
    for text in inputs:
        prefix, sep, rest = text.partition("=")
        # a path may hold "=" (dt=2020/...): only a split name is taken as a prefix
        split, path = (prefix, Path(rest)) if sep and prefix in SPLITS else ("train", Path(text))
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            if not files:
                raise DataError(f"{text}: the folder {str(path)!r} holds no files to convert.")
        elif path.is_file():
            files = [path]
        else:
            hint = f" A split prefix is one of {', '.join(SPLITS)}.{did_you_mean(prefix, SPLITS)}" if sep else ""
            raise DataError(f"INPUT {str(path)!r} does not exist; give a file or a folder of PaddleRec text.{hint}")
        out.setdefault(split, []).extend(files)
    if not out:
        raise UserError("give at least one INPUT (a file or folder of PaddleRec ESMM text).")
    return out


def convert_paddlerec(
    inputs: Sequence[str],
    out_dir: str | Path,
    fields: str | Sequence[str] | None = "default",
    shard_rows: int = DEFAULT_SHARD_ROWS,
    skip_bad: bool = False,
    chunk_rows: int = CHUNK_ROWS,
    progress_rows: int = PROGRESS_ROWS,
) -> dict:
    """Convert PaddleRec ESMM text files (``[SPLIT=]PATH`` each, see :func:`parse_inputs`) to the
    layout of :func:`convert_aliccp` (weights 1.0, ``conversion`` becomes ``purchase``)."""
    _require_pyarrow()
    out_dir = Path(out_dir)
    _check_shard_rows(shard_rows)
    splits = parse_inputs(inputs)
    selected = resolve_fields(fields)
    _check_out_dir(out_dir)
    if selected is None:
        selected = _discover([(p, paddlerec.parse_lines) for files in splits.values() for p in files], skip_bad)
    report = {"format": "paddlerec-esmm", "fields": list(selected), "splits": {}}
    parse = lambda lines: paddlerec.parse_lines(lines, selected)  # noqa: E731
    with _staged(out_dir) as tmp:
        for split, files in splits.items():
            stats, reports = _SplitStats(selected), []
            progress = _Progress(split, progress_rows)
            with _ShardWriter(tmp / split, aliccp.schema(selected), shard_rows) as writer:
                for path in files:
                    reports.append(aliccp.FileReport(str(path)))
                    for parsed in aliccp.iter_parsed(path, parse, reports[-1], skip_bad, chunk_rows):
                        table = aliccp.to_table(parsed.sample_id, parsed.click, parsed.purchase, selected, parsed.lists)
                        writer.write(table)
                        stats.add(parsed, parsed.lists)
                        progress(stats.rows)
            rate = progress.done()
            out = stats.as_dict()
            out.update(shards=len(writer.files), rows_per_second=round(rate), files=[r.as_dict() for r in reports])
            _warn(split, out, reports)
            report["splits"][split] = out
        _publish(tmp, out_dir, report)
    return report


def summary(report: dict) -> dict:
    """rows, clicks and purchases per split: what `funnel convert` prints."""
    return {s: {k: v[k] for k in ("rows", "clicks", "purchases")} for s, v in report["splits"].items()}
