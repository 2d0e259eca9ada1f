"""`funnel fit`: config → data → model → Lightning Trainer → run directory.

Order of work, so that nothing is lost and no half-made run is left behind:
1. the config, the Trainer arguments and the model (built on the meta device) are validated
   (no data read yet, see funnel/training/preflight.py);
2. the run directory is claimed (exclusive mkdir and lock, see funnel/claim.py);
3. data is read, encoded and checked; the model and the Trainer are built: a user error
   here removes the claimed directory again;
4. config.yaml, encoders.json and run.json are written (atomically), then training runs;
   an interrupted run keeps checkpoints/last.ckpt and continues with `funnel fit --resume`;
5. the best checkpoint and the metrics are written; run.json says "complete".
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from funnel.atomic import copy_file, write_text
from funnel.claim import RunClaim, claim_existing, claim_new
from funnel.data.datamodule import FunnelDataModule
from funnel.data.featurizer import Featurizer
from funnel.errors import UserError
from funnel.inference import evaluate_table
from funnel.models.registry import create_model
from funnel.runs import (
    BEST,
    ENCODERS,
    LAST,
    METRICS,
    METRICS_VALID,
    build_graph,
    interrupted_hint,
    load_config_of_run,
    read_manifest,
    save_config,
    write_manifest,
)
from funnel.spec import Config, load_config
from funnel.training import resume_logs
from funnel.training.guards import DivergenceGuard, TrainingDiverged
from funnel.training.metrics import free_stages
from funnel.training.module import FunnelLightningModule
from funnel.training.monitor import choose_monitor
from funnel.training.preflight import preflight
from funnel.training.trainer_args import quiet_lightning, raise_trainer_data_problems

log = logging.getLogger(__name__)


def fit(config_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Path:
    cfg, _ = load_config(config_path, overrides)
    return fit_config(cfg, config_path)


def fit_config(cfg: Config, config_path: str | Path = "config.yaml") -> Path:
    preflight(cfg)
    claim = claim_new(cfg.run_dir, config_path, refused_hint=_resume_hint(cfg.run_dir))
    return _train(cfg, claim, resume_from=None)


def resume(run_dir: str | Path, trust_plugins: bool = False) -> Path:
    """Continue an interrupted run in its own directory from checkpoints/last.ckpt."""
    run_dir = Path(run_dir)
    cfg = load_config_of_run(run_dir, trust_plugins)
    status = read_manifest(run_dir).get("status")
    if status == "complete" or (run_dir / BEST).is_file():
        raise UserError(
            f"--resume: {run_dir} finished training already (it has {BEST}); nothing to resume. "
            "Evaluate it with `funnel evaluate`, or train a new run."
        )
    preflight(cfg)
    claim = claim_existing(run_dir)
    last = run_dir / LAST
    if not last.is_file():
        log.warning("%s has no %s (it stopped before its first epoch ended): training from the start", run_dir, LAST)
    return _train(cfg, claim, resume_from=last if last.is_file() else None)


def _resume_hint(run_dir: str | None) -> str:
    return interrupted_hint(Path(run_dir)) if run_dir and Path(run_dir).is_dir() else ""


def _train(cfg: Config, claim: RunClaim, resume_from: Path | None) -> Path:
    run_dir = claim.path
    resuming = (run_dir / ENCODERS).is_file()
    try:
        trainer, module, dm, checkpoint, monitor = _build(cfg, run_dir, resuming)
        if not resuming:
            save_config(cfg, run_dir)
            dm.featurizer.save(run_dir / ENCODERS)
        write_manifest(
            run_dir,
            status="running",
            started=time.strftime("%Y-%m-%dT%H:%M:%S"),
            monitor=monitor,
            resumed_from=str(resume_from) if resume_from else None,
        )
    except BaseException:
        if resuming:
            claim.release()
        else:
            claim.discard()  # nothing trained yet: leave nothing behind
        raise
    try:
        old_logs = resume_logs.set_aside(run_dir) if resuming else None
        _fit(trainer, module, dm, resume_from)
        resume_logs.merge(run_dir, old_logs)
        _finish(cfg, trainer, module, dm, checkpoint, monitor, run_dir)
    except TrainingDiverged:
        if resume_from is None:
            claim.discard()
            raise
        write_manifest(run_dir, status="failed", error="diverged")
        claim.release()
        raise
    except BaseException as exc:
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        write_manifest(run_dir, status=status, error=f"{type(exc).__name__}: {exc}"[:500])
        claim.release()
        if isinstance(exc, KeyboardInterrupt) and (run_dir / LAST).is_file():
            log.warning("interrupted; continue this run with `funnel fit --resume %s`", run_dir)
        raise
    write_manifest(run_dir, status="complete", finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
    claim.release()
    return run_dir


def _build(cfg: Config, run_dir: Path, resuming: bool):
    """Data, model, module and Trainer; every user error of the data surfaces here."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    graph = build_graph(cfg)
    featurizer = Featurizer.load(run_dir / ENCODERS, cfg, graph) if resuming else None
    dm = FunnelDataModule(cfg, graph, featurizer)
    dm.prepare()
    raise_trainer_data_problems(cfg, train_rows=len(dm.tables["train"]))
    model = create_model(graph, cfg.funnel, dm.featurizer.layout())
    valid = dm.tables["valid"]
    module = FunnelLightningModule(
        model, cfg.optim, with_truth=bool(valid.truth), free=free_stages(model.graph, valid.truth)
    )
    monitor, mode = choose_monitor(cfg, graph, valid)
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="epoch{epoch}",
        auto_insert_metric_name=False,
        monitor=monitor,
        mode=mode,
        save_top_k=cfg.trainer.save_top_k,
        save_last=True,
    )
    callbacks: list[pl.Callback] = [checkpoint, DivergenceGuard(cfg.optim.lr), _Progress(run_dir)]
    if cfg.trainer.early_stopping is not None:
        callbacks.append(EarlyStopping(monitor=monitor, mode=mode, patience=cfg.trainer.early_stopping))
    kwargs = {"enable_model_summary": False, **cfg.trainer.kwargs}
    kwargs["logger"] = CSVLogger(run_dir, name="logs", version="") if kwargs.get("logger", True) else False
    with quiet_lightning():  # the arguments were checked before the data was read
        trainer = pl.Trainer(default_root_dir=run_dir, callbacks=callbacks, **kwargs)
    return trainer, module, dm, checkpoint, monitor


def _fit(trainer: pl.Trainer, module: FunnelLightningModule, dm: FunnelDataModule, ckpt: Path | None) -> None:
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=str(ckpt) if ckpt else None)
    except SystemExit:  # Lightning turns Ctrl-C into sys.exit(1) after its graceful shutdown
        if trainer.interrupted:
            raise KeyboardInterrupt from None
        raise
    if trainer.interrupted:
        raise KeyboardInterrupt


def _finish(
    cfg: Config,
    trainer: pl.Trainer,
    module: FunnelLightningModule,
    dm: FunnelDataModule,
    checkpoint: ModelCheckpoint,
    monitor: str,
    run_dir: Path,
) -> None:
    best = checkpoint.best_model_path or checkpoint.last_model_path
    if not best:  # fast_dev_run and friends save nothing: keep the final weights
        trainer.save_checkpoint(run_dir / "checkpoints" / "final.ckpt")
        best = str(run_dir / "checkpoints" / "final.ckpt")
    copy_file(best, run_dir / BEST)
    log.info("best checkpoint: %s (%s = %s)", best, monitor, checkpoint.best_model_score)

    state = torch.load(run_dir / BEST, map_location="cpu", weights_only=True)["state_dict"]
    module.load_state_dict(state)
    model = module.model
    split = "test" if "test" in dm.tables else "valid"
    metrics = {"split": split, **evaluate_table(model, dm.tables[split], cfg.data.eval_batch_size)}
    if split == "test":
        valid = {"split": "valid", **evaluate_table(model, dm.tables["valid"], cfg.data.eval_batch_size)}
        write_text(run_dir / METRICS_VALID, json.dumps(valid, indent=1))
    write_text(run_dir / METRICS, json.dumps(metrics, indent=1))


class _Progress(pl.Callback):
    """Keeps run.json's count of finished epochs, for the message that offers to resume."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking:
            write_manifest(self.run_dir, epochs_done=trainer.current_epoch + 1)
