"""`funnel fit`: config → data → model → Lightning Trainer → run directory."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.exceptions import MisconfigurationException
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from funnel.data.datamodule import FunnelDataModule
from funnel.errors import ConfigError
from funnel.inference import evaluate_table
from funnel.models.registry import create_model
from funnel.runs import BEST, ENCODERS, METRICS, METRICS_VALID, build_graph, run_dir_path, save_config
from funnel.spec import Config, load_config
from funnel.training.metrics import free_stages
from funnel.training.module import FunnelLightningModule

log = logging.getLogger(__name__)


def fit(config_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Path:
    cfg, _ = load_config(config_path, overrides)
    return fit_config(cfg, config_path)


def fit_config(cfg: Config, config_path: str | Path = "config.yaml") -> Path:
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    graph = build_graph(cfg)
    run_dir = run_dir_path(cfg, config_path)
    # Everything that can fail on user input happens before the run dir exists, so bad data,
    # tower arguments or Trainer arguments never leave a half-made run behind.
    dm = FunnelDataModule(cfg, graph)
    dm.prepare()
    model = create_model(graph, cfg.funnel, dm.featurizer.layout())
    valid = dm.tables["valid"]
    module = FunnelLightningModule(model, cfg.optim, with_truth=bool(valid.truth), free=free_stages(model.graph, valid.truth))
    monitor = cfg.trainer.monitor or f"val/auc/{graph.names[-1]}"
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints", filename="epoch{epoch}", auto_insert_metric_name=False,
        monitor=monitor, mode=cfg.trainer.mode, save_top_k=cfg.trainer.save_top_k, save_last=True,
    )
    callbacks: list[pl.Callback] = [checkpoint]
    if cfg.trainer.early_stopping is not None:
        callbacks.append(EarlyStopping(monitor=monitor, mode=cfg.trainer.mode, patience=cfg.trainer.early_stopping))
    kwargs = {"enable_model_summary": False, **cfg.trainer.kwargs}
    kwargs["logger"] = CSVLogger(run_dir, name="logs", version="") if kwargs.get("logger", True) else False
    try:
        trainer = pl.Trainer(default_root_dir=run_dir, callbacks=callbacks, **kwargs)
    except (MisconfigurationException, ValueError, TypeError) as exc:
        raise ConfigError(f"trainer: Lightning rejected the Trainer arguments {cfg.trainer.kwargs}: {exc}") from None

    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir)
    dm.featurizer.save(run_dir / ENCODERS)
    trainer.fit(module, datamodule=dm)

    best = checkpoint.best_model_path or checkpoint.last_model_path
    if not best:  # fast_dev_run and friends save nothing: keep the final weights
        trainer.save_checkpoint(run_dir / "checkpoints" / "final.ckpt")
        best = str(run_dir / "checkpoints" / "final.ckpt")
    shutil.copyfile(best, run_dir / BEST)
    log.info("best checkpoint: %s (%s = %s)", best, monitor, checkpoint.best_model_score)

    state = torch.load(run_dir / BEST, map_location="cpu", weights_only=True)["state_dict"]
    module.load_state_dict(state)
    split = "test" if "test" in dm.tables else "valid"
    metrics = {"split": split, **evaluate_table(model, dm.tables[split], cfg.data.eval_batch_size)}
    (run_dir / METRICS).write_text(json.dumps(metrics, indent=1))
    if split == "test":
        valid = {"split": "valid", **evaluate_table(model, dm.tables["valid"], cfg.data.eval_batch_size)}
        (run_dir / METRICS_VALID).write_text(json.dumps(valid, indent=1))
    return run_dir
