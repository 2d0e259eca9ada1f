"""Ali-CCP (Tianchi dataset 408, the ESMM paper's data): its fields, the converted layout, and a
vectorised parser of the official raw release.

The raw release holds, for each split S in {train, test}, two comma-separated files without header:

    sample_skeleton_S.csv   sample_id,click,buy,md5,feature_num,feature_list   one impression a line
    common_features_S.csv   md5,feature_num,feature_list                       one user context a line

``feature_list`` joins ``feature_num`` features with ``\\x01``; each feature is
``field_id \\x02 feat_id \\x03 value``. The skeleton's features describe the ad, the common ones the
user, shared by every impression whose ``md5`` names that line.

Parsing works on whole blocks of lines with Arrow compute kernels (split, regex extract, cast) and
numpy; no Python runs per line or per feature, except to describe the first few malformed lines.
"""

from __future__ import annotations

import contextlib
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from funnel.data.field_lists import FieldLists, group_by_field, offsets_of
from funnel.errors import DataError

# The 23 fields of the dataset's documentation (and of PaddleRec's ESMM reader).
USER_FIELDS = ("101", "121", "122", "124", "125", "126", "127", "128", "129", "109_14", "110_14", "127_14", "150_14")
AD_FIELDS = ("205", "206", "207", "210", "216", "508", "509", "702", "853", "301")
FIELDS = USER_FIELDS + AD_FIELDS
LABELS = ("click", "purchase")

SKELETON_COLUMNS = ("sample_id", "click", "buy", "md5", "feature_num", "feature_list")
COMMON_COLUMNS = ("md5", "feature_num", "feature_list")
_FEATURE = r"^(?P<field>[^\x01\x02\x03]+)\x02(?P<id>[^\x01\x02\x03]+)\x03(?P<value>[^\x01\x02\x03]+)$"
_INT = r"^-?[0-9]{1,18}$"  # 18 digits always fit in int64, so a cast after this check cannot overflow
_FLOAT = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$"  # what Arrow casts, bar nan/inf
EXAMPLES = 5  # malformed lines described per file in convert.json
BLOCK_BYTES = 32 << 20  # lines read at a time; a common-features line is ~12 KB, far below this


def weight_column(name: str) -> str:
    """The column of a field's per-id values: ``w_<field>``."""
    return f"w_{name}"


@dataclass
class Parsed:
    """One block of lines, parsed. When some lines are malformed only ``bad`` and ``problems`` are
    set (the caller stops, or drops those lines and parses the block again)."""

    n: int
    bad: np.ndarray | None = None  # bool per line
    problems: dict[int, str] = field(default_factory=dict)  # line position -> what is wrong (the first few)
    sample_id: np.ndarray | None = None
    click: np.ndarray | None = None
    purchase: np.ndarray | None = None
    key: object = None  # the skeleton's md5 column (pyarrow), the join key into the common features
    lists: list[FieldLists] = field(default_factory=list)  # one per requested field
    unknown: Counter = field(default_factory=Counter)  # fields not requested: feature counts
    feature_num_mismatch: int = 0  # lines whose feature_num differs from their number of features


class LineChecks:
    """Which lines of a block are malformed, and the problem of the first few (by position)."""

    def __init__(self, n: int):
        self.mask = np.zeros(n, bool)
        self.problems: dict[int, str] = {}

    def add(self, bad: np.ndarray, describe: Callable[[int], str]) -> None:
        for r in np.flatnonzero(bad & ~self.mask)[:EXAMPLES]:
            self.problems[int(r)] = describe(int(r))
        # each check describes its first few lines, so the first few of all are among them
        self.problems = dict(sorted(self.problems.items())[:EXAMPLES])
        self.mask |= bad

    def result(self, n: int) -> Parsed | None:
        return Parsed(n, bad=self.mask, problems=self.problems) if self.mask.any() else None


def _bool(mask) -> np.ndarray:
    """A pyarrow boolean array as numpy, null counted as False."""
    import pyarrow.compute as pc

    return pc.fill_null(mask, False).to_numpy(zero_copy_only=False)


def parse_ints(col, checks: LineChecks, rows: np.ndarray, what: str) -> np.ndarray | None:
    """``col`` (strings) as int64; None, with the offending lines in ``checks``, when some are not integers."""
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        return pc.cast(col, pa.int64()).to_numpy(zero_copy_only=False)
    except pa.ArrowInvalid as exc:
        error = str(exc)
    _flag_items(~_bool(pc.match_substring_regex(col, _INT)), rows, checks, col, what, "is not an integer", error)
    return None


def parse_floats(col, checks: LineChecks, rows: np.ndarray, what: str) -> np.ndarray | None:
    """``col`` (strings) as finite float32; None, with the offending lines in ``checks``, otherwise."""
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        values = pc.cast(col, pa.float32()).to_numpy(zero_copy_only=False)
    except pa.ArrowInvalid as exc:
        bad = ~_bool(pc.match_substring_regex(col, _FLOAT))
        _flag_items(bad, rows, checks, col, what, "is not a number", str(exc))
        return None
    finite = np.isfinite(values)
    if finite.all():
        return values
    _flag_items(~finite, rows, checks, col, what, "is not a finite number")
    return None


def _flag_items(bad_items, rows, checks: LineChecks, col, what: str, problem: str, error: str = "") -> None:
    """Mark the lines that hold a bad item, describing each by its first bad item."""
    positions = np.flatnonzero(bad_items)
    if len(positions) == 0:  # Arrow refused a value that the pattern accepts: name every line of the block
        checks.add(np.ones(len(checks.mask), bool), lambda r: f"{what}s cannot be read ({error})")
        return
    lines = rows[positions]  # non-decreasing, as the items are listed line by line
    line_mask = np.zeros(len(checks.mask), bool)
    line_mask[lines] = True
    first = lambda r: col[int(positions[np.searchsorted(lines, r)])].as_py()  # noqa: E731
    checks.add(line_mask, lambda r: f"{what} {first(r)!r} {problem}")


def parse_labels(col, name: str, checks: LineChecks) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.compute as pc

    ok = _bool(pc.is_in(col, value_set=pa.array(["0", "1"])))
    checks.add(~ok, lambda r: f"{name} is {col[r].as_py()!r}, expected 0 or 1")
    return (pc.equal(col, "1").to_numpy(zero_copy_only=False)).astype(np.int8)


def split_columns(lines, names: Sequence[str], checks: LineChecks, exact: bool = True):
    """(the first ``len(names)`` comma-separated columns, all columns as list<string>), or None with
    the lines that have a wrong number of columns (fewer, or also more when ``exact``) in ``checks``."""
    import pyarrow.compute as pc

    parts = pc.split_pattern(lines, ",")
    count = pc.list_value_length(parts).to_numpy(zero_copy_only=False)
    bad = count != len(names) if exact else count < len(names)
    hint = ",".join(names) + ("" if exact else ",...")
    checks.add(bad, lambda r: f"has {count[r]} comma-separated columns, expected {len(names)} ({hint})")
    if bad.any():
        return None
    return [pc.list_element(parts, j) for j in range(len(names))], parts


def parse_features(
    lists, n: int, fields: Sequence[str], checks: LineChecks, pattern: str, what: str, with_values: bool
) -> tuple[list[FieldLists], Counter, np.ndarray] | None:
    """Per-field id lists from ``lists`` (a pyarrow list<string> of features per line, nulls for none).

    ``pattern`` names the groups ``field`` and ``id`` (and ``value`` when ``with_values``); a feature
    that does not match it marks its line as malformed. Returns the lists, the counts of features of
    fields not in ``fields``, and the number of features per line."""
    import pyarrow as pa
    import pyarrow.compute as pc

    items = pc.list_flatten(lists)
    rows = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)
    per_line = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False)
    parts = pc.extract_regex(items, pattern)
    ok = _bool(pc.is_valid(parts))
    if not ok.all():
        shape = "field\\x02feat_id\\x03value" if with_values else "field:feat_id"
        _flag_items(~ok, rows, checks, items, what, f"is not {shape}")
        return None
    ids = parse_ints(pc.struct_field(parts, "id"), checks, rows, f"{what} id")
    weights = (
        parse_floats(pc.struct_field(parts, "value"), checks, rows, f"{what} value")
        if with_values
        else np.ones(len(items), np.float32)
    )
    if ids is None or weights is None:
        return None
    names = pc.struct_field(parts, "field")
    codes = pc.fill_null(pc.index_in(names, value_set=pa.array(list(fields), pa.string())), -1)
    codes = codes.to_numpy(zero_copy_only=False).astype(np.int32)
    unknown = Counter()
    if (codes < 0).any():
        counts = pc.value_counts(pc.filter(names, pa.array(codes < 0)))
        unknown.update({c["values"].as_py(): c["counts"].as_py() for c in counts})
    return group_by_field(rows, codes, ids, weights, n, len(fields)), unknown, per_line


def _feature_lists(col):
    """Split feature_list on \\x01; an empty list gives no features (not one empty feature)."""
    import pyarrow.compute as pc

    return pc.split_pattern(pc.if_else(pc.equal(col, ""), None, col), "\x01")


def _keyed_features(md5, feature_num, feature_list, fields: Sequence[str], checks: LineChecks, n: int):
    """The part both files share: a non-empty md5, the feature count and the features of each
    line. (lists, unknown fields, lines whose feature_num disagrees), or None when a line is bad."""
    import pyarrow.compute as pc

    counts = parse_ints(feature_num, checks, np.arange(n), "feature_num")
    checks.add(_bool(pc.equal(md5, "")), lambda r: "md5 is empty")
    if checks.result(n) is not None:
        return None
    features = parse_features(_feature_lists(feature_list), n, fields, checks, _FEATURE, "feature", True)
    if features is None:
        return None
    lists, unknown, per_line = features
    return lists, unknown, int((counts != per_line).sum())


def parse_skeleton(lines, fields: Sequence[str]) -> Parsed:
    """Parse a block of ``sample_skeleton_*.csv`` lines (a pyarrow string array, no blank lines)."""
    n = len(lines)
    checks = LineChecks(n)
    split = split_columns(lines, SKELETON_COLUMNS, checks)
    if split is None:
        return checks.result(n)
    (sample_id, click, buy, md5, feature_num, feature_list), _ = split
    ids = parse_ints(sample_id, checks, np.arange(n), "sample_id")
    clicks, buys = parse_labels(click, "click", checks), parse_labels(buy, "buy", checks)
    keyed = _keyed_features(md5, feature_num, feature_list, fields, checks, n)
    if keyed is None:
        return checks.result(n)
    lists, unknown, mismatch = keyed
    return Parsed(
        n,
        sample_id=ids,
        click=clicks,
        purchase=buys,
        key=md5,
        lists=lists,
        unknown=unknown,
        feature_num_mismatch=mismatch,
    )


def parse_common(lines, fields: Sequence[str]) -> Parsed:
    """Parse a block of ``common_features_*.csv`` lines: ``key`` holds the md5 of each line."""
    n = len(lines)
    checks = LineChecks(n)
    split = split_columns(lines, COMMON_COLUMNS, checks)
    if split is None:
        return checks.result(n)
    (md5, feature_num, feature_list), _ = split
    keyed = _keyed_features(md5, feature_num, feature_list, fields, checks, n)
    if keyed is None:
        return checks.result(n)
    lists, unknown, mismatch = keyed
    return Parsed(n, key=md5, lists=lists, unknown=unknown, feature_num_mismatch=mismatch)


@dataclass
class FileReport:
    """What reading one raw file found; it goes into convert.json."""

    path: str
    lines: int = 0  # data lines kept
    blank_lines: int = 0  # skipped, and counted here
    malformed: int = 0
    examples: list[dict] = field(default_factory=list)  # {"line": n, "problem": "..."} of the first few
    unknown_fields: Counter = field(default_factory=Counter)
    feature_num_mismatch: int = 0

    def as_dict(self) -> dict:
        return {
            "path": self.path,
            "lines": self.lines,
            "blank_lines": self.blank_lines,
            "malformed_lines": self.malformed,
            "malformed_examples": self.examples,
            "unknown_fields": dict(sorted(self.unknown_fields.items())),
            "feature_num_mismatch": self.feature_num_mismatch,
        }


def iter_lines(path: Path, block_bytes: int = BLOCK_BYTES) -> Iterator[tuple[int, object]]:
    """(number of the first line, 1-based; the block's lines as a pyarrow string array), streaming."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv

    read = pa_csv.ReadOptions(column_names=["line"], block_size=block_bytes)
    # one column per line: \x1f (ASCII unit separator) never appears in these text formats; quoting
    # is off and blank lines are kept, so every physical line is one row and line numbers are exact
    parse = pa_csv.ParseOptions(delimiter="\x1f", quote_char=False, ignore_empty_lines=False)
    convert = pa_csv.ConvertOptions(column_types={"line": pa.string()})
    first = 1
    try:
        reader = pa_csv.open_csv(path, read_options=read, parse_options=parse, convert_options=convert)
        for batch in reader:
            yield first, batch.column(0)
            first += batch.num_rows
    except pa.ArrowInvalid as exc:
        if "Empty CSV file" in str(exc):
            return
        text = re.sub(r"^CSV parse error: ", "", str(exc))
        raise DataError(
            f"{path}: cannot be read as text lines ({text}). Is it the uncompressed file (not .gz or .tar)? "
            "Lines must be UTF-8 and hold no \\x1f byte."
        ) from None


def _pieces(blocks: Iterator[tuple[int, object]], max_rows: int | None) -> Iterator[tuple[int, object]]:
    for first, lines in blocks:
        step = max_rows or len(lines) or 1
        for start in range(0, len(lines), step):
            yield first + start, lines.slice(start, step)


def iter_parsed(
    path: Path,
    parse: Callable[[object], Parsed],
    report: FileReport,
    skip_bad: bool,
    max_rows: int | None = None,
    block_bytes: int = BLOCK_BYTES,
) -> Iterator[Parsed]:
    """Parse ``path`` in blocks of at most ``max_rows`` lines. A malformed line stops with a DataError
    naming the file, the line and the problem, unless ``skip_bad``: then it is dropped and counted
    (the first few with their problem in ``report``)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    for first, lines in _pieces(iter_lines(path, block_bytes), max_rows):
        numbers = np.arange(first, first + len(lines))
        blank = _bool(pc.equal(pc.utf8_length(lines), 0))
        if blank.any():
            report.blank_lines += int(blank.sum())
            lines, numbers = lines.filter(pa.array(~blank)), numbers[~blank]
        while True:
            parsed = parse(lines)
            if parsed.bad is None:
                break
            for r, problem in sorted(parsed.problems.items()):
                if not skip_bad:
                    raise DataError(
                        f"{path}, line {numbers[r]}: {problem}. Fix or remove the line, or pass --skip-bad "
                        "to skip malformed lines (they are counted in convert.json)."
                    )
                if len(report.examples) < EXAMPLES:
                    report.examples.append({"line": int(numbers[r]), "problem": problem})
            report.malformed += int(parsed.bad.sum())
            keep = ~parsed.bad
            lines, numbers = lines.filter(pa.array(keep)), numbers[keep]
        report.lines += parsed.n
        report.unknown_fields.update(parsed.unknown)
        report.feature_num_mismatch += parsed.feature_num_mismatch
        yield parsed


class CommonFeatures:
    """The per-user features of one ``common_features_*.csv``, parsed once into flat files in a folder
    (per field, ids int64 and weights float32, memory-mapped: about the size of the raw file) and an
    md5 -> line index in memory (~100 bytes a key, plus 8 bytes per key and field for the offsets)."""

    def __init__(self, keys, lines: np.ndarray, lists: list[FieldLists], duplicates: int):
        self.keys = keys  # pandas Index of the unique md5 strings
        self.lines = lines  # the line (position) of each key's first occurrence
        self.lists = lists
        self.duplicates = duplicates

    @classmethod
    def build(
        cls,
        path: Path,
        folder: Path,
        fields: Sequence[str],
        report: FileReport,
        skip_bad: bool,
        progress: Callable[[int], None] | None = None,
    ) -> CommonFeatures:
        import pandas as pd
        import pyarrow as pa

        folder.mkdir(parents=True)
        keys, lengths = [], [[] for _ in fields]
        with contextlib.ExitStack() as stack:
            files = [
                (
                    stack.enter_context(open(folder / f"{k}.ids", "wb")),
                    stack.enter_context(open(folder / f"{k}.w", "wb")),
                )
                for k in range(len(fields))
            ]
            for parsed in iter_parsed(path, lambda lines: parse_common(lines, fields), report, skip_bad):
                keys.append(parsed.key)
                for k, lists in enumerate(parsed.lists):
                    lengths[k].append(lists.lengths())
                    lists.ids.tofile(files[k][0])
                    lists.weights.tofile(files[k][1])
                if progress is not None:
                    progress(report.lines)
        index = pd.Index(pa.chunked_array(keys, pa.string()).to_numpy(), dtype=object)
        duplicated = index.duplicated(keep="first")
        out = []
        for k in range(len(fields)):
            offsets = offsets_of(np.concatenate(lengths[k]) if lengths[k] else np.zeros(0, np.int64))
            out.append(
                FieldLists(offsets, _mapped(folder / f"{k}.ids", np.int64), _mapped(folder / f"{k}.w", np.float32))
            )
        return cls(index[~duplicated], np.flatnonzero(~duplicated), out, int(duplicated.sum()))

    def __len__(self) -> int:
        return len(self.keys)

    def lookup(self, md5) -> np.ndarray:
        """The common-features line of each md5 (a pyarrow string array); -1 where it has none."""
        pos = self.keys.get_indexer(md5.to_numpy(zero_copy_only=False))
        return np.where(pos >= 0, self.lines[np.maximum(pos, 0)] if len(self.lines) else -1, -1)

    def gather(self, lines: np.ndarray) -> list[FieldLists]:
        return [lists.take(lines) for lists in self.lists]


def _mapped(path: Path, dtype: type) -> np.ndarray:
    """The array stored in ``path``, memory-mapped read-only (pages are read when gathered)."""
    if path.stat().st_size == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def schema(fields: Sequence[str]):
    """The converted layout: sample_id, the labels, then per field its ids and their weights."""
    import pyarrow as pa

    columns = [("sample_id", pa.int64()), ("click", pa.int8()), ("purchase", pa.int8())]
    for name in fields:
        columns += [(name, pa.list_(pa.int64())), (weight_column(name), pa.list_(pa.float32()))]
    return pa.schema(columns)


def to_table(sample_id: np.ndarray, click: np.ndarray, purchase: np.ndarray, fields: Sequence[str], lists):
    """One converted block as a pyarrow Table of :func:`schema` (zero-copy from the numpy arrays)."""
    import pyarrow as pa

    columns = [pa.array(sample_id, pa.int64()), pa.array(click, pa.int8()), pa.array(purchase, pa.int8())]
    for ragged in lists:
        offsets = pa.array(ragged.offsets.astype(np.int32))  # list offsets are int32: < 2**31 ids a block
        columns.append(pa.ListArray.from_arrays(offsets, pa.array(ragged.ids, pa.int64())))
        columns.append(pa.ListArray.from_arrays(offsets, pa.array(ragged.weights, pa.float32())))
    return pa.Table.from_arrays(columns, schema=schema(fields))
