"""The LightningDataModule: data → fitted encoders → encoded tables → batch loaders (per rank).

File data goes through the streaming prepare pass (funnel/data/prepare.py) into an encoded
store on disk, the data cache (funnel/data/cache.py), and is memory-mapped from there: the
rows never have to fit in memory. The synthetic funnel is generated and encoded in memory.
Under DDP rank 0 prepares once (``save_prepared``) and the other ranks open the same store
(``open_prepared``); every rank's loaders read only its share of the rows.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytorch_lightning as pl

from funnel.data import cache, store
from funnel.data.cache import cache_key, expected_splits, open_store
from funnel.data.degenerate import check_degenerate
from funnel.data.featurizer import Featurizer
from funnel.data.grow import grow
from funnel.data.loader import BatchLoader
from funnel.data.prepare import ENCODERS, fit_streaming, id_dtype_of
from funnel.data.sources import load_frames
from funnel.data.table import EncodedTable
from funnel.graph import FunnelGraph
from funnel.spec.schema import Config

log = logging.getLogger(__name__)


class FunnelDataModule(pl.LightningDataModule):
    def __init__(
        self,
        cfg: Config,
        graph: FunnelGraph,
        featurizer: Featurizer | None = None,
        prepared: Path | None = None,
        grow_from: Featurizer | None = None,
    ):
        """``prepared``: a store written by ``save_prepared`` (another rank's), opened as it is.
        ``grow_from``: the encoders of a warm start's first run; the new ones are fitted on this
        data and grown from them (see funnel/training/warm_start.py)."""
        super().__init__()
        self.grow_from = grow_from
        self.cfg = cfg
        self.graph = graph
        self.featurizer = featurizer or Featurizer(cfg, graph)
        self.tables: dict[str, EncodedTable] = {}
        self.prepared = Path(prepared) if prepared is not None else None
        self.store_dir: Path | None = None  # the cache entry the tables are mapped from, if any

    @classmethod
    def open_prepared(cls, cfg: Config, graph: FunnelGraph, directory: Path) -> FunnelDataModule:
        """The data module of a store another process prepared (no raw data is read)."""
        dm = cls(cfg, graph, prepared=directory)
        dm.prepare()
        return dm

    def prepare(self) -> None:
        """Read, fit (train only) and encode once; later calls are free. File data is cached
        on disk, so a second run on the same files neither parses nor encodes them again."""
        if self.tables:
            return
        if self.prepared is not None:
            self.featurizer, self.tables = open_store(
                self.prepared, self.cfg, self.graph, list(_splits_in(self.prepared))
            )
            log.info("opened the prepared data %s: %s", self.prepared, self._sizes())
            return
        if self.cfg.data.synthetic is not None:
            self._prepare_in_memory()
            return
        if self.grow_from is not None and not self.featurizer.fitted:
            fit_streaming(self.cfg, self.featurizer)
            self._grow()
        key = cache_key(self.cfg) if self.cfg.data.cache and not self.featurizer.fitted else None
        if key is not None:
            hit = cache.load(self.cfg, self.graph, key)
            if hit is not None:
                self.featurizer, self.tables = hit
                self.store_dir = cache.cache_root(self.cfg) / key
                log.info("data cache hit %s: %s", key, self._sizes())
                check_degenerate(self.tables, self.graph, self.cfg)
                return
        directory = cache.build(self.cfg, self.graph, self.featurizer, key, self._check)
        self.featurizer, self.tables = open_store(directory, self.cfg, self.graph, expected_splits(self.cfg))
        if key is None or directory.name != key:  # a scratch store: mapped now, its files can go
            shutil.rmtree(directory, ignore_errors=True)
        else:
            self.store_dir = directory
        log.info("prepared %s", self._sizes())

    def _grow(self) -> None:
        grow(self.grow_from, self.featurizer, self.cfg.warm_start.refit_numerics)

    def _check(self, tables: dict[str, EncodedTable]) -> None:
        check_degenerate(tables, self.graph, self.cfg)  # before the cache: never store unusable data

    def _prepare_in_memory(self) -> None:
        frames = load_frames(self.cfg)
        if not self.featurizer.fitted:
            self.featurizer.fit(frames["train"])
            if self.grow_from is not None:
                self._grow()
        for split, df in frames.items():
            self.tables[split] = self.featurizer.encode(df, split)
            log.info("%s: %d rows encoded (%.1f MB)", split, len(self.tables[split]), self.tables[split].nbytes() / 1e6)
        del frames
        check_degenerate(self.tables, self.graph, self.cfg)

    def _sizes(self) -> dict[str, int]:
        return {k: len(t) for k, t in self.tables.items()}

    def save_prepared(self, directory: Path) -> Path:
        """A store of this data module's encoders and tables for other processes to open: the
        cache entry they are mapped from, else the tables written into ``directory``."""
        self.prepare()
        if self.store_dir is not None:
            return self.store_dir
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        id_dtype = id_dtype_of(self.featurizer)
        for split, table in self.tables.items():
            store.write_split(directory, split, table, id_dtype)
        self.featurizer.save(directory / ENCODERS)
        return directory

    def setup(self, stage: str | None = None) -> None:
        self.prepare()

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> BatchLoader:
        rank, world = self._rank()
        d = self.cfg.data
        return BatchLoader(
            self.tables["train"],
            d.batch_size,
            shuffle=True,
            seed=self.cfg.seed,
            rank=rank,
            world_size=world,
            epoch_of=self._epoch,
            order=d.shuffle,
            block_rows=d.shuffle_block_rows,
            buffer_blocks=d.shuffle_buffer_blocks,
        )

    def _epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def _eval_loader(self, table: EncodedTable) -> BatchLoader:
        rank, world = self._rank()  # each rank one contiguous range; metrics synchronise
        return BatchLoader(table, self.cfg.data.eval_batch_size, rank=rank, world_size=world)

    def val_dataloader(self) -> BatchLoader:
        return self._eval_loader(self.tables["valid"])

    def test_dataloader(self) -> BatchLoader:
        return self._eval_loader(self.tables.get("test", self.tables["valid"]))


def _splits_in(directory: Path) -> list[str]:
    return [s for s in ("train", "valid", "test") if (Path(directory) / f"{s}.json").is_file()]
