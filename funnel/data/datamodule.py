"""The LightningDataModule: frames → fitted encoders → encoded tables → batch loaders."""

from __future__ import annotations

import logging

import pytorch_lightning as pl

from funnel.data import cache
from funnel.data.cache import cache_key
from funnel.data.degenerate import check_degenerate
from funnel.data.featurizer import Featurizer
from funnel.data.loader import BatchLoader
from funnel.data.sources import load_frames
from funnel.data.table import EncodedTable
from funnel.graph import FunnelGraph
from funnel.spec.schema import Config

log = logging.getLogger(__name__)


class FunnelDataModule(pl.LightningDataModule):
    def __init__(self, cfg: Config, graph: FunnelGraph, featurizer: Featurizer | None = None):
        super().__init__()
        self.cfg = cfg
        self.graph = graph
        self.featurizer = featurizer or Featurizer(cfg, graph)
        self.tables: dict[str, EncodedTable] = {}

    def prepare(self) -> None:
        """Read, fit (train only) and encode once; later calls are free. File data is cached
        on disk (see funnel/data/cache.py), so a second run on the same files skips parsing."""
        if self.tables:
            return
        key = cache_key(self.cfg) if self.cfg.data.cache and not self.featurizer.fitted else None
        if key is not None:
            hit = cache.load(self.cfg, self.graph, key)
            if hit is not None:
                self.featurizer, self.tables = hit
                log.info("data cache hit %s: %s", key, {k: len(t) for k, t in self.tables.items()})
                check_degenerate(self.tables, self.graph, self.cfg)
                return
        frames = load_frames(self.cfg)
        if not self.featurizer.fitted:
            self.featurizer.fit(frames["train"])
        for split, df in frames.items():
            self.tables[split] = self.featurizer.encode(df, split)
            log.info("%s: %d rows encoded (%.1f MB)", split, len(self.tables[split]), self.tables[split].nbytes() / 1e6)
        del frames
        check_degenerate(self.tables, self.graph, self.cfg)  # before the cache: never store unusable data
        if key is not None:
            cache.save(self.cfg, key, self.featurizer, self.tables)

    def setup(self, stage: str | None = None) -> None:
        self.prepare()

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> BatchLoader:
        rank, world = self._rank()
        return BatchLoader(
            self.tables["train"],
            self.cfg.data.batch_size,
            shuffle=True,
            seed=self.cfg.seed,
            rank=rank,
            world_size=world,
            epoch_of=self._epoch,
        )

    def _epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def val_dataloader(self) -> BatchLoader:
        return BatchLoader(self.tables["valid"], self.cfg.data.eval_batch_size)

    def test_dataloader(self) -> BatchLoader:
        return BatchLoader(self.tables.get("test", self.tables["valid"]), self.cfg.data.eval_batch_size)
