"""`funnel prepare`: the streaming preparation pass on its own (fit runs it when the cache misses).

Fits the encoders over the train split chunk by chunk and writes every split, encoded, to the
data cache (see funnel/data/cache.py and funnel/data/store.py); a later `funnel fit` on the
same files and encoding maps the cached store instead of reading the files again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from funnel.data.datamodule import FunnelDataModule
from funnel.errors import UserError
from funnel.runs import build_graph
from funnel.spec import load_config


def prepare(config_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Prepare the data of a config; returns the store's folder, its rows per split and bytes on disk."""
    cfg, _ = load_config(config_path, overrides)
    if cfg.data.synthetic is not None:
        raise UserError(
            "prepare: data.synthetic is generated in memory by `funnel fit`; prepare works on data files "
            "(data.train: a file, a folder of shards or a glob)."
        )
    if not cfg.data.cache:
        raise UserError("prepare: data.cache is false, so nothing would be kept; set data.cache: true.")
    dm = FunnelDataModule(cfg, build_graph(cfg))
    dm.prepare()
    directory = dm.store_dir
    size = sum(p.stat().st_size for p in directory.iterdir()) if directory is not None else 0
    rows = {split: len(t) for split, t in dm.tables.items()}
    return {
        "store": str(directory) if directory is not None else None,
        "rows": rows,
        "bytes": size,
        "bytes_per_row": round(size / max(sum(rows.values()), 1), 1),
    }
