"""An on-disk cache of fitted encoders and encoded tensors for file-based data.

The key is a hash of every input file's bytes plus everything that shapes the encoding
(features, stage labels, CSV options, the validation hold-out, the seed, the
label-conflict policy and the encoder format). Sizes and modification times are never
trusted: an edited file is a miss even when its size and mtime are unchanged, while a
copied or touched file with the same bytes still hits. The hash is sha256, the fastest of
hashlib's where the CPU has SHA instructions (~1.5 GB/s from the page cache, blake2b ~0.8).

An entry holds ``encoders.json``, one ``<split>.pt`` per split (loaded with
``weights_only=True``) and ``manifest.json``, written last, with every file's size and
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
from pathlib import Path

import torch

from funnel.data.featurizer import FORMAT_VERSION, Featurizer
from funnel.data.io import resolve_path
from funnel.data.table import EncodedTable
from funnel.graph import FunnelGraph
from funnel.spec.schema import Config

log = logging.getLogger(__name__)
CACHE_ENV = "FUNNEL_CACHE_DIR"
LAYOUT = 2  # entry layout: 2 = content-keyed, with manifest.json
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
            p = resolve_path(path)
            try:
                files[split] = [p.stat().st_size, digest(p)]
            except OSError:
                return None  # reading the data reports the missing or unreadable file with its fix
    shape = {
        "layout": LAYOUT,
        "format": FORMAT_VERSION,
        "encoding": ENCODING,
        "files": files,
        "features": [dataclasses.asdict(f) for f in cfg.features],
        "stages": [[s.name, s.label_column, s.after, list(s.positive or [])] for s in cfg.funnel.stages],
        "csv": dataclasses.asdict(d.csv),
        "valid_split": d.valid_split if not d.valid else None,
        "seed": cfg.seed if not d.valid else None,
        "label_conflicts": d.label_conflicts,
    }
    return hashlib.sha256(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()[:24]


def expected_splits(cfg: Config) -> list[str]:
    """The splits prepare() encodes: valid is a file or held out of train; test only when set."""
    return ["train", "valid", "test"] if cfg.data.test else ["train", "valid"]


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
    wanted = {ENCODERS} | {f"{s}.pt" for s in splits}
    if set(listed) != wanted:
        return f"it holds {sorted(listed)}, the config needs {sorted(wanted)}"
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
    """The cached encoders and tables, or None (a miss); a damaged entry is deleted."""
    root = cache_root(cfg)
    sweep(root)
    entry = root / key
    if not os.path.lexists(entry):
        return None
    splits = expected_splits(cfg)
    reason = problem(entry, key, splits)
    if reason is None:
        try:
            featurizer = Featurizer.load(entry / ENCODERS, cfg, graph)
            tables = {}
            for split in splits:
                state = torch.load(entry / f"{split}.pt", map_location="cpu", weights_only=True)
                tables[split] = EncodedTable(**state)
            return featurizer, tables
        except Exception as exc:  # noqa: BLE001  (a damaged entry is a miss, never a failure)
            reason = str(exc)
    log.warning("ignoring the damaged cache entry %s (%s); deleting it so that it is rebuilt", entry, reason)
    discard(entry)
    return None


def save(cfg: Config, key: str, featurizer: Featurizer, tables: dict[str, EncodedTable]) -> None:
    """Write the entry for `key`; a valid entry already there is kept, a damaged one replaced."""
    root = cache_root(cfg)
    tmp = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        sweep(root)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
        featurizer.save(tmp / ENCODERS)
        for split, table in tables.items():  # the tensors themselves, not copies
            torch.save({f.name: getattr(table, f.name) for f in dataclasses.fields(table)}, tmp / f"{split}.pt")
        files = {p.name: {"size": p.stat().st_size, "sha256": digest(p)} for p in sorted(tmp.iterdir())}
        (tmp / MANIFEST).write_text(json.dumps({"key": key, "files": files}, indent=1))  # last: it vouches for the rest
        publish(tmp, root / key, key, list(tables))
    except OSError as exc:  # a read-only or full disk must not stop training
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        log.warning("could not write the data cache under %s (%s); set data.cache: false to skip it", root, exc)


def publish(tmp: Path, entry: Path, key: str, splits: list[str]) -> None:
    """Rename the finished `tmp` to `entry`, unless another process already wrote a valid one."""
    if os.path.lexists(entry):
        reason = problem(entry, key, splits)
        if reason is None:  # another process got there first
            shutil.rmtree(tmp, ignore_errors=True)
            return
        log.warning("replacing the damaged cache entry %s (%s)", entry, reason)
        discard(entry)
    try:
        os.rename(tmp, entry)
    except OSError:
        if not os.path.lexists(entry):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process got there first, just now


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
