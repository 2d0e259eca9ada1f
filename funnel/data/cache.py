"""An on-disk cache of fitted encoders and encoded tensors for file-based data.

The key is a hash of every input file's resolved path, size and modification time, plus
everything that shapes the encoding (features, stage labels, CSV options, the validation
hold-out, the seed, the label-conflict policy and the encoder format). A hit restores
``encoders.json`` and one ``<split>.pt`` per split, loaded with ``weights_only=True``; a
changed file or config is a miss. Entries are written to a temporary folder first and
renamed into place, so a crash never leaves a half-written entry behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from funnel.data.featurizer import FORMAT_VERSION, Featurizer
from funnel.data.io import resolve_path
from funnel.data.table import EncodedTable
from funnel.graph import FunnelGraph
from funnel.spec.schema import Config

log = logging.getLogger(__name__)
CACHE_ENV = "FUNNEL_CACHE_DIR"


def cache_root(cfg: Config) -> Path:
    if cfg.data.cache_dir:
        return resolve_path(cfg.data.cache_dir)
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "funnel"


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
            if not p.is_file():
                return None  # reading the data reports the missing file with its fix
            st = p.stat()
            files[split] = [str(p.resolve()), st.st_size, st.st_mtime_ns]
    shape = {
        "format": FORMAT_VERSION,
        "files": files,
        "features": [dataclasses.asdict(f) for f in cfg.features],
        "stages": [[s.name, s.label_column, s.after, list(s.positive or [])] for s in cfg.funnel.stages],
        "csv": dataclasses.asdict(d.csv),
        "valid_split": d.valid_split if not d.valid else None,
        "seed": cfg.seed if not d.valid else None,
        "label_conflicts": d.label_conflicts,
    }
    return hashlib.sha256(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()[:24]


def load(cfg: Config, graph: FunnelGraph, key: str) -> tuple[Featurizer, dict[str, EncodedTable]] | None:
    entry = cache_root(cfg) / key
    if not (entry / "encoders.json").is_file():
        return None
    try:
        featurizer = Featurizer.load(entry / "encoders.json", cfg, graph)
        tables = {}
        for path in sorted(entry.glob("*.pt")):
            state = torch.load(path, map_location="cpu", weights_only=True)
            tables[path.stem] = EncodedTable(**state)
    except Exception as exc:  # noqa: BLE001  (a damaged entry is a miss, never a failure)
        log.warning("ignoring the damaged cache entry %s (%s)", entry, exc)
        return None
    return featurizer, tables


def save(cfg: Config, key: str, featurizer: Featurizer, tables: dict[str, EncodedTable]) -> None:
    root = cache_root(cfg)
    tmp = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
        featurizer.save(tmp / "encoders.json")
        for split, table in tables.items():  # the tensors themselves, not copies
            torch.save({f.name: getattr(table, f.name) for f in dataclasses.fields(table)}, tmp / f"{split}.pt")
        if (root / key).exists():  # another process got there first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, root / key)
    except OSError as exc:  # a read-only or full disk must not stop training
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        log.warning("could not write the data cache under %s (%s); set data.cache: false to skip it", root, exc)
