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

Under DDP global rank 0 does all of this; the other ranks wait for its prepared data, train
beside it and write nothing (funnel/training/distributed.py says how they find the run). The
final metrics are rank 0's alone, over the whole split, computed as `funnel evaluate` does.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import shutil
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, LearningRateMonitor

from funnel.atomic import write_text
from funnel.claim import RunClaim, claim_existing, claim_new
from funnel.data.datamodule import FunnelDataModule
from funnel.data.featurizer import Featurizer
from funnel.errors import DataError, UserError
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
from funnel.training import distributed, resume_logs, warm_start
from funnel.training.averaging import WeightAverage
from funnel.training.carry_optimizer import CarryOptimizer
from funnel.training.checkpointing import BackgroundCheckpointIO, BestAndLast, is_lean, remove_partials, write_lean
from funnel.training.distributed import Launch
from funnel.training.guards import DivergenceGuard, TrainingDiverged
from funnel.training.health import TrainingHealth
from funnel.training.loggers import build_loggers
from funnel.training.metrics import free_stages
from funnel.training.module import FunnelLightningModule
from funnel.training.monitor import choose_monitor
from funnel.training.preflight import preflight
from funnel.training.priors import init_head_priors
from funnel.training.progress import StderrProgressBar, show_progress
from funnel.training.schedule import needs_scheduler
from funnel.training.trainer_args import quiet_lightning, raise_trainer_data_problems

log = logging.getLogger(__name__)

VALID_ONLY = (
    "computed on the valid split, which chose the best checkpoint (and stopped training): an optimistic "
    "estimate. Give data.test (a file) or data.test_split (a share of train) for an unbiased one."
)

# Lightning callbacks added to every run trained inside `with extra_callbacks(...)` (funnel tune's pruning)
_EXTRA_CALLBACKS: contextvars.ContextVar[tuple[pl.Callback, ...]] = contextvars.ContextVar("extra", default=())


@contextlib.contextmanager
def extra_callbacks(*callbacks: pl.Callback):
    """Add ``callbacks`` to the Trainer of every run started in this block."""
    token = _EXTRA_CALLBACKS.set(callbacks)
    try:
        yield
    finally:
        _EXTRA_CALLBACKS.reset(token)


def fit(config_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """Train the config at ``config_path`` (with ``key=value`` overrides); return the run directory."""
    cfg, _ = load_config(config_path, overrides)
    return fit_config(cfg, config_path)


def fit_config(cfg: Config, config_path: str | Path = "config.yaml") -> Path:
    """Train ``cfg`` into a new run directory and return it (on every rank under DDP; only rank 0
    writes into it, see funnel/training/distributed.py)."""
    preflight(cfg)
    launch = distributed.detect(cfg)
    run_dir = distributed.shared_run_dir(cfg, config_path, launch)
    if launch.follower:
        return _follow(cfg, launch, Path(run_dir) if run_dir else None, resume_from=None)
    claim = claim_new(run_dir, config_path, refused_hint=_resume_hint(run_dir))
    return _train(cfg, claim, None, launch)


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
    launch = distributed.detect(cfg)
    last = run_dir / LAST
    if launch.follower:
        return _follow(cfg, launch, run_dir, resume_from=last if last.is_file() else None, resume=True)
    claim = claim_existing(run_dir)
    if not last.is_file():
        log.warning("%s has no %s (it stopped before its first epoch ended): training from the start", run_dir, LAST)
    return _train(cfg, claim, last if last.is_file() else None, launch)


def _resume_hint(run_dir: str | None) -> str:
    return interrupted_hint(Path(run_dir)) if run_dir and Path(run_dir).is_dir() else ""


def _train(cfg: Config, claim: RunClaim, resume_from: Path | None, launch: Launch) -> Path:
    """The owner's part: prepare, write the run's files, train, evaluate, finish."""
    run_dir = claim.path
    resuming = (run_dir / ENCODERS).is_file()
    prepared: Path | None = None
    try:
        if launch.distributed:  # from now on the other ranks know this launch owns run_dir
            # (a resumed run's earlier "prepared" and failure are not this launch's: cleared)
            write_manifest(run_dir, launch=launch.launch_id, status="preparing", prepared=None, error=None)
        trainer, module, dm, checkpoint, monitor = _build(cfg, run_dir, resuming, launch.world_size)
        if launch.distributed:
            prepared = _share(dm, run_dir, launch)
        if not resuming:
            save_config(cfg, run_dir)
            dm.featurizer.save(run_dir / ENCODERS)
        write_manifest(
            run_dir,
            status="running",
            started=time.strftime("%Y-%m-%dT%H:%M:%S"),
            monitor=monitor,
            resumed_from=str(resume_from) if resume_from else None,
            # last: the other ranks start when they read it
            **({"prepared": distributed.prepared_entry(run_dir, prepared)} if prepared else {}),
        )
    except BaseException:
        _remove_run_local(run_dir)
        if resuming:
            claim.release()
        else:
            claim.discard()  # nothing trained yet: leave nothing behind
        raise
    handoff = (
        distributed.handed_to_children(run_dir, prepared)
        if launch.launches_ranks and prepared
        else contextlib.nullcontext()
    )
    try:
        old_logs = resume_logs.set_aside(run_dir) if resuming else None
        with handoff:
            _fit(trainer, module, dm, resume_from)
            best = _best_checkpoint(trainer, checkpoint, run_dir)
        resume_logs.merge(run_dir, old_logs)
        _finish(cfg, module, dm, best, checkpoint, monitor, run_dir)
        write_manifest(run_dir, health=_health(trainer))
    except TrainingDiverged:
        _health(trainer, diverged=True)
        distributed.stop_children(trainer)
        _remove_run_local(run_dir)
        if resume_from is None and not launch.distributed:
            claim.discard()  # a new run that diverged holds nothing worth keeping
            raise
        # (under DDP the other ranks may be recording into it as they stop: kept, marked failed)
        write_manifest(run_dir, status="failed", error="diverged", failed_rank=launch.rank)
        claim.release()
        raise
    except BaseException as exc:
        distributed.stop_children(trainer)
        _remove_run_local(run_dir)
        peer = distributed.peer_failure(run_dir, launch, exc)
        distributed.record_failure(run_dir, launch, exc)
        claim.release()
        if isinstance(exc, KeyboardInterrupt) and (run_dir / LAST).is_file():
            log.warning("interrupted; continue this run with `funnel fit --resume %s`", run_dir)
        if peer is not None:
            raise peer from None
        raise
    _remove_run_local(run_dir)
    write_manifest(run_dir, status="complete", finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
    claim.release()
    return run_dir


def _share(dm: FunnelDataModule, run_dir: Path, launch: Launch) -> Path:
    """Where the other ranks open this data: the cache entry it is mapped from, else a copy
    written into the run (removed when the run ends)."""
    local = run_dir / distributed.PREPARED
    shutil.rmtree(local, ignore_errors=True)  # a resumed run's leftover: written again
    prepared = dm.save_prepared(local)
    log.info("%d ranks read the prepared data in %s", launch.world_size, prepared)
    return prepared


def _remove_run_local(run_dir: Path) -> None:
    """The run-local copy of the prepared data goes when the run ends, however it ends."""
    shutil.rmtree(run_dir / distributed.PREPARED, ignore_errors=True)


def _follow(cfg: Config, launch: Launch, run_dir: Path | None, resume_from: Path | None, resume: bool = False) -> Path:
    """A rank other than 0: train in the run rank 0 owns, on the data it prepared; write nothing."""
    distributed.quiet_follower(launch)
    if launch.handoff is not None:
        run_dir, prepared = launch.handoff.run_dir, launch.handoff.prepared
    else:
        assert run_dir is not None  # shared_run_dir gives one to every independent rank
        prepared = distributed.wait_for_owner(run_dir, launch, resume=resume)
    try:
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        dm = FunnelDataModule.open_prepared(cfg, build_graph(cfg), prepared)
        # the carried optimiser state is read by every rank (DDP broadcasts only the weights)
        carry = cfg.init_from and cfg.warm_start.init_optimizer and not resume
        source = warm_start.load_source(cfg) if carry else None
        trainer, module, checkpoint, _ = _build_training(cfg, dm, run_dir, source)
        handoff = (
            distributed.handed_to_children(run_dir, prepared) if launch.launches_ranks else contextlib.nullcontext()
        )
        with handoff:
            _fit(trainer, module, dm, resume_from)
            _best_checkpoint(trainer, checkpoint, run_dir)
    except BaseException as exc:
        peer = distributed.peer_failure(run_dir, launch, exc)
        if peer is not None:
            raise peer from None
        distributed.record_failure(run_dir, launch, exc)
        raise
    return run_dir


def _build(cfg: Config, run_dir: Path, resuming: bool, world_size: int):
    """Data, model, module and Trainer; every user error of the data surfaces here."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    graph = build_graph(cfg)
    featurizer = Featurizer.load(run_dir / ENCODERS, cfg, graph) if resuming else None
    source = warm_start.load_source(cfg) if cfg.init_from and not resuming else None  # a resume has its weights
    dm = FunnelDataModule(cfg, graph, featurizer, grow_from=source.featurizer if source else None)
    dm.prepare()
    raise_trainer_data_problems(cfg, len(dm.tables["train"]), world_size)
    _raise_too_few_rows(dm, world_size)
    trainer, module, checkpoint, monitor = _build_training(cfg, dm, run_dir, source)
    return trainer, module, dm, checkpoint, monitor


def _raise_too_few_rows(dm: FunnelDataModule, world_size: int) -> None:
    """Every rank needs rows of every split: a rank without a batch would skip the epoch's end,
    where the others wait for it to synchronise the metrics."""
    if world_size == 1:
        return
    small = {split: len(table) for split, table in dm.tables.items() if len(table) < world_size}
    if small:
        raise DataError(
            f"data: {', '.join(f'{s} has {n} row(s)' for s, n in small.items())}, fewer than the {world_size} DDP "
            "ranks (trainer.devices x trainer.num_nodes): give every split at least one row per rank, or use fewer."
        )


def _build_training(cfg: Config, dm: FunnelDataModule, run_dir: Path, source: warm_start.WarmSource | None = None):
    """Model, module, callbacks and Trainer for prepared data: the same on every rank (a warm
    start's weights are rank 0's: DDP broadcasts them when it wraps the model; its optimiser
    state, with warm_start.init_optimizer, is loaded by every rank)."""
    graph = dm.graph
    if source is not None:
        model = warm_start.build_model(cfg, graph, dm.featurizer, source)
    else:
        model = create_model(graph, cfg.funnel, dm.featurizer.layout())
        init_head_priors(model, getattr(dm.tables.get("train"), "labels", None))  # base rates, not 0.5
    valid = dm.tables["valid"]
    clip = cfg.trainer.clips_gradients  # optim.sparse_embeddings: auto then stays dense
    module = FunnelLightningModule(
        model, cfg.optim, with_truth=bool(valid.truth), free=free_stages(model.graph, valid.truth), clip=clip
    )
    monitor, mode = choose_monitor(cfg, graph, valid)
    # the best epoch's weights alone (epochN.ckpt) and everything --resume needs (last.ckpt)
    checkpoint = BestAndLast(
        dirpath=run_dir / "checkpoints",
        filename="epoch{epoch}",
        auto_insert_metric_name=False,
        monitor=monitor,
        mode=mode,
        save_top_k=cfg.trainer.save_top_k,
    )
    callbacks: list[pl.Callback] = [checkpoint, DivergenceGuard(cfg.optim.lr), _Progress(run_dir)]
    callbacks.append(TrainingHealth(graph.names))  # warns of a stuck stage; summarised by _health
    if cfg.optim.ema_decay:  # validated, checkpointed and evaluated on the average
        callbacks.append(WeightAverage(cfg.optim.ema_decay, cfg.optim.ema_warmup))
    callbacks += _EXTRA_CALLBACKS.get()
    if source is not None and cfg.warm_start.init_optimizer:
        callbacks.append(CarryOptimizer(source, cfg.optim, model, clip))
    if needs_scheduler(cfg.optim.schedule, cfg.optim.warmup_steps):  # lr-<optimiser> per epoch in metrics.csv
        callbacks.append(LearningRateMonitor(logging_interval="epoch"))
    if cfg.trainer.early_stopping is not None:
        callbacks.append(EarlyStopping(monitor=monitor, mode=mode, patience=cfg.trainer.early_stopping))
    kwargs = {"enable_model_summary": False, **cfg.trainer.kwargs, "enable_progress_bar": show_progress(cfg)}
    if kwargs["enable_progress_bar"]:
        callbacks.append(StderrProgressBar())  # Lightning's own bar writes to stdout, the results' stream
    kwargs["logger"] = build_loggers(cfg, run_dir)  # logs/metrics.csv always, and trainer.logger's others
    with quiet_lightning():  # the arguments were checked before the data was read
        trainer = pl.Trainer(
            default_root_dir=run_dir, callbacks=callbacks, plugins=[BackgroundCheckpointIO()], **kwargs
        )
    return trainer, module, checkpoint, monitor


def _fit(trainer: pl.Trainer, module: FunnelLightningModule, dm: FunnelDataModule, ckpt: Path | None) -> None:
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=str(ckpt) if ckpt else None)
    except SystemExit:  # Lightning turns Ctrl-C into sys.exit(1) after its graceful shutdown
        if trainer.interrupted:
            raise KeyboardInterrupt from None
        raise
    if trainer.interrupted:
        raise KeyboardInterrupt


def _best_checkpoint(trainer: pl.Trainer, checkpoint: BestAndLast, run_dir: Path) -> str:
    """The best checkpoint's path (the same on every rank: Lightning broadcasts it). Every rank
    calls this: saving the final weights, when no checkpoint was kept, is a collective."""
    best = checkpoint.best_model_path or checkpoint.last_model_path
    if not best:  # fast_dev_run and friends save nothing: keep the final weights
        best = str(run_dir / "checkpoints" / "final.ckpt")
        trainer.save_checkpoint(best, weights_only=True)
        trainer.strategy.checkpoint_io.teardown()  # written before anyone reads it
    return best


def _finish(
    cfg: Config,
    module: FunnelLightningModule,
    dm: FunnelDataModule,
    best: str,
    checkpoint: BestAndLast,
    monitor: str,
    run_dir: Path,
) -> None:
    """Rank 0 alone: the best checkpoint and the metrics of the whole test (and valid) split,
    computed in this process by the same function as `funnel evaluate`."""
    _keep_one_best(Path(best), run_dir)
    kept = {Path(p).name for p in checkpoint.best_k_models}  # save_top_k > 1 keeps the others
    for stale in (run_dir / "checkpoints").glob("epoch*.ckpt"):  # a crash left it between a save and a removal
        if stale.name not in kept:
            stale.unlink()
    score = checkpoint.best_model_score
    shown = "n/a" if score is None else f"{float(score):.6g}"
    log.info("best checkpoint: %s (%s, %s = %s)", run_dir / BEST, Path(best).name, monitor, shown)

    state = torch.load(run_dir / BEST, map_location="cpu", weights_only=True)["state_dict"]
    module.load_state_dict(state)
    model = module.model
    split = "test" if "test" in dm.tables else "valid"
    metrics = {"split": split, **evaluate_table(model, dm.tables[split], cfg.data.eval_batch_size)}
    if split == "valid":  # no test split: the metrics are of the rows that chose the checkpoint
        metrics = {"split": split, "note": VALID_ONLY, **{k: v for k, v in metrics.items() if k != "split"}}
        log.warning("metrics.json: %s", VALID_ONLY)
    if split == "test":
        valid = {"split": "valid", **evaluate_table(model, dm.tables["valid"], cfg.data.eval_batch_size)}
        write_text(run_dir / METRICS_VALID, json.dumps(valid, indent=1))
    write_text(run_dir / METRICS, json.dumps(metrics, indent=1))


def _keep_one_best(best: Path, run_dir: Path) -> None:
    """Make checkpoints/best.ckpt the one copy of the best weights, weights only: the best
    epoch's file is renamed to it (rewritten without its optimiser state when it has one: a
    run interrupted before checkpoints were lean, or fast_dev_run's final.ckpt).
    checkpoints/last.ckpt stays, whole, for the optimiser moments of warm starts; without a
    monitored checkpoint (save_top_k 0) best.ckpt is the weights of last.ckpt."""
    target, last = run_dir / BEST, run_dir / LAST
    if best.resolve() == last.resolve():
        write_lean(last, target)
    elif is_lean(best):
        best.replace(target)
    else:
        write_lean(best, target)
        best.unlink()
    remove_partials(target.parent)


def _health(trainer: pl.Trainer, diverged: bool = False) -> dict[str, str]:
    """Log the one-line health of every stage (learned / stuck / diverged); run.json keeps it."""
    health = next((c for c in trainer.callbacks if isinstance(c, TrainingHealth)), None)
    return health.finish(trainer, diverged) if health is not None else {}


class _Progress(pl.Callback):
    """Keeps run.json's count of finished epochs, for the message that offers to resume."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking:
            write_manifest(self.run_dir, epochs_done=trainer.current_epoch + 1)
