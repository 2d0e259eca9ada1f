"""An on-disk cache of fitted encoders and encoded data for file-based data: the encoded store.

The key is a hash of every input file's bytes plus everything that shapes the encoding
(features, stage labels, CSV options, the validation hold-out, the seed, the
label-conflict policy and the encoder format). Sizes and modification times are never
trusted: an edited file is a miss even when its size and mtime are unchanged, while a
copied or touched file with the same bytes still hits. The hash is sha256, the fastest of
hashlib's where the CPU has SHA instructions (~1.5 GB/s from the page cache, blake2b ~0.8).

An entry is an encoded store (funnel/data/store.py: ``encoders.json``, per split a
``<split>.json`` and its memory-mapped array files), written by the streaming prepare pass
(funnel/data/prepare.py), and ``manifest.json``, written last, with every file's size and
sha256. A hit is only used when the manifest lists exactly the files in the entry, every
checksum matches and the splits are the ones the config expects; anything else is
logged, deleted and treated as a miss, so the next write replaces it. Entries are written
to a temporary folder ``.<key>-*`` and renamed into place, so a crash never leaves a
half-written entry; temporary folders untouched for an hour (from a killed write) are
removed whenever the cache is read or written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from funnel.data import store
from funnel.data.featurizer import FORMAT_VERSION, Featurizer
from funnel.data.io import input_files, resolve_path
from funnel.data.prepare import prepare_store
from funnel.data.splits import BLOCK as SPLIT_BLOCK
from funnel.data.splits import Holdout, expected_splits
from funnel.data.table import EncodedTable
from funnel.errors import DataError
from funnel.graph import FunnelGraph
from funnel.spec.schema import Config

log = logging.getLogger(__name__)
CACHE_ENV = "FUNNEL_CACHE_DIR"
LAYOUT = 3  # entry layout: 2 = content-keyed, with manifest.json; 3 = an encoded store
# bumped when an encoder's output changes, so that entries encoded before are not reused:
# 2 = a categorical feature with share_with is encoded with the other feature's vocabulary
ENCODING = 2
ENCODERS = "encoders.json"
MANIFEST = "manifest.json"
BLOCK = 8 << 20  # 256 KiB to 8 MiB reads measured alike; 32 MiB was slower
STALE_S = 3600.0  # a temporary folder untouched this long belongs to a killed write
_TMP_NAME = re.compile(r"\.[0-9a-f]{24}-")  # ".<key>-…" from save(), never a user's dotfile


def cache_root(cfg: Config) -> Path:
    if cfg.data.cache_dir:
        return resolve_path(cfg.data.cache_dir)
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "funnel"


def digest(path: Path) -> str:
    """sha256 of a file's bytes, read in 8 MiB blocks into one reused buffer."""
    h = hashlib.sha256()
    buf = memoryview(bytearray(BLOCK))
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(buf[:n])
    return h.hexdigest()


def cache_key(cfg: Config) -> str | None:
    """The entry for this config's files, or None when the data is not file-based."""
    d = cfg.data
    if d.synthetic is not None or not d.train:
        return None
    files = {}
    for split in ("train", "valid", "test"):
        path = getattr(d, split)
        if path:
            try:  # every shard of a directory or glob, in order
                files[split] = [[p.stat().st_size, digest(p)] for p in input_files(path, f"data.{split}")]
            except (OSError, DataError):
                return None  # reading the data reports the missing or unreadable file with its fix
    held = Holdout.of(d)
    shape = {
        "layout": LAYOUT,
        "format": FORMAT_VERSION,
        "encoding": ENCODING,
        "files": files,
        "features": [dataclasses.asdict(f) for f in cfg.features],
        "stages": [[s.name, s.label_column, s.after, list(s.positive or [])] for s in cfg.funnel.stages],
        "csv": dataclasses.asdict(d.csv),
        "chunk_rows": d.chunk_rows,  # label conflicts are dropped per chunk: the same rows, but keyed safely
        "holdout": None if held is None else [held.shares, d.split_seed, d.split_by, SPLIT_BLOCK],
        "label_conflicts": d.label_conflicts,
    }
    return hashlib.sha256(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()[:24]


def problem(entry: Path, key: str, splits: list[str]) -> str | None:
    """Why `entry` cannot be trusted, or None when its manifest vouches for every file in it."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        listed = manifest["files"]
        if manifest.get("key") != key or not isinstance(listed, dict):
            return f"{MANIFEST} belongs to another entry"
        present = {p.name for p in entry.iterdir()} - {MANIFEST}
    except FileNotFoundError:
        return f"no {MANIFEST}"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable {MANIFEST}: {exc}"
    listed_splits = sorted(n.removesuffix(".json") for n in listed if n.endswith(".json") and n != ENCODERS)
    if ENCODERS not in listed or listed_splits != sorted(splits):
        return f"it holds the splits {listed_splits}, the config needs {sorted(splits)}"
    wanted = set(listed)
    if present != wanted:
        return f"files not in {MANIFEST}: {sorted(present - wanted)}, missing: {sorted(wanted - present)}"
    for name, meta in listed.items():
        try:
            ok = (entry / name).stat().st_size == meta["size"] and digest(entry / name) == meta["sha256"]
        except (OSError, KeyError, TypeError) as exc:
            return f"{name}: {exc}"
        if not ok:
            return f"{name} does not match its checksum"
    return None


def load(cfg: Config, graph: FunnelGraph, key: str) -> tuple[Featurizer, dict[str, EncodedTable]] | None:
    """The cached encoders and tables (memory-mapped), or None (a miss); a damaged entry is deleted."""
    root = cache_root(cfg)
    sweep(root)
    entry = root / key
    if not os.path.lexists(entry):
        return None
    splits = expected_splits(cfg)
    reason = problem(entry, key, splits)
    if reason is None:
        try:
            return open_store(entry, cfg, graph, splits)
        except Exception as exc:  # noqa: BLE001  (a damaged entry is a miss, never a failure)
            reason = str(exc)
    log.warning("ignoring the damaged cache entry %s (%s); deleting it so that it is rebuilt", entry, reason)
    discard(entry)
    return None


def open_store(
    directory: Path, cfg: Config, graph: FunnelGraph, splits: list[str]
) -> tuple[Featurizer, dict[str, EncodedTable]]:
    featurizer = Featurizer.load(directory / ENCODERS, cfg, graph)
    return featurizer, {split: store.open_split(directory, split) for split in splits}


Check = Callable[[dict[str, EncodedTable]], None]


def build(cfg: Config, graph: FunnelGraph, featurizer: Featurizer, key: str | None, check: Check) -> Path:
    """Prepare the store for ``cfg`` and return its folder: the cache entry ``key``, or, without a
    key (cache off, a fitted featurizer) or when the cache cannot be written, a scratch folder the
    caller removes once the files are mapped. ``check`` runs on the opened tables before the
    entry is published: unusable data is never stored."""
    root = cache_root(cfg)
    if key is not None:
        try:
            root.mkdir(parents=True, exist_ok=True)
            sweep(root)
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
        except OSError as exc:  # a read-only or full disk must not stop training
            log.warning("could not write the data cache under %s (%s); set data.cache: false to skip it", root, exc)
            key = None
    if key is None:
        tmp = Path(tempfile.mkdtemp(prefix="funnel-prepared-"))
    try:
        prepare_store(cfg, featurizer, tmp)
        check(open_store(tmp, cfg, graph, expected_splits(cfg))[1])
        if key is None:
            return tmp
        files = {
            p.name: {"size": p.stat().st_size, "sha256": digest(p)} for p in sorted(tmp.iterdir()) if p.name != MANIFEST
        }
        (tmp / MANIFEST).write_text(json.dumps({"key": key, "files": files}, indent=1))  # last: it vouches for the rest
        return publish(tmp, root / key, key, expected_splits(cfg))
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if key is None:
            raise
        log.warning("could not write the data cache under %s (%s); preparing without it", root, exc)
        return build(cfg, graph, featurizer, None, check)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish(tmp: Path, entry: Path, key: str, splits: list[str]) -> Path:
    """Rename the finished `tmp` to `entry`, unless another process already wrote a valid one."""
    if os.path.lexists(entry):
        reason = problem(entry, key, splits)
        if reason is None:  # another process got there first
            shutil.rmtree(tmp, ignore_errors=True)
            return entry
        log.warning("replacing the damaged cache entry %s (%s)", entry, reason)
        discard(entry)
    try:
        os.rename(tmp, entry)
    except OSError:
        if not os.path.lexists(entry):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process got there first, just now
    return entry


def discard(entry: Path) -> None:
    """Delete an entry, never raising: renamed aside first, so no reader sees it half-deleted."""
    aside = entry.with_name(f".{entry.name}-damaged-{secrets.token_hex(4)}")
    try:
        os.rename(entry, aside)
    except FileNotFoundError:
        return  # another process discarded it first
    except OSError:
        aside = entry  # cannot be renamed: delete it where it is
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside, ignore_errors=True)
        return
    try:
        aside.unlink(missing_ok=True)
    except OSError as exc:  # a miss must not become a failure; the next save() tries again
        log.warning("could not delete the damaged cache entry %s (%s)", aside, exc)


def sweep(root: Path) -> None:
    """Remove temporary folders of killed writes: untouched for STALE_S; a fresh one may be in use."""
    try:
        candidates = [p for p in root.iterdir() if _TMP_NAME.match(p.name)]
    except OSError:
        return  # no cache folder yet
    now = time.time()
    for tmp in candidates:
        try:
            touched = max([tmp.lstat().st_mtime] + [p.lstat().st_mtime for p in tmp.iterdir()])
        except OSError:
            continue  # renamed or removed by its writer meanwhile
        if now - touched > STALE_S:
            shutil.rmtree(tmp, ignore_errors=True)
            log.info("removed the stale temporary cache folder %s", tmp)
