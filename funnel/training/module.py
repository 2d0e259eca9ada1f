"""A generic LightningModule: it takes any FunnelModel and trains it on its own objective.

Under DDP every value logged per epoch is the whole split's: the validation metrics and loss
are torchmetrics states synchronised across ranks when computed, the training epoch means are
all-reduced sums over rows. Each is then the same on every rank, so the monitor that picks the
best checkpoint and stops early agrees everywhere.
"""

from __future__ import annotations

import logging
import math

import pytorch_lightning as pl
import torch
from torch import Tensor

from funnel.data.table import LABELS
from funnel.models.registry import FunnelModel, model_loss
from funnel.spec.schema import OptimSpec
from funnel.training.lazy_adam import LazyAdam
from funnel.training.metrics import FunnelMetrics, WeightedMean, truth_of
from funnel.training.schedule import build_scheduler, needs_scheduler
from funnel.training.sparse_choice import choose

log = logging.getLogger(__name__)


def stage_auc_mean(values: dict[str, float], names: list[str] | tuple[str, ...]) -> float:
    """The mean of the stages' path AUCs (``auc/<stage>``) that are defined (NaN: none is): the
    monitor that funnel falls back on when the last stage's AUC rests on too few labels."""
    aucs = [values.get(f"auc/{n}", math.nan) for n in names]
    aucs = [a for a in aucs if not math.isnan(a)]
    return sum(aucs) / len(aucs) if aucs else math.nan


class FunnelLightningModule(pl.LightningModule):
    def __init__(
        self,
        model: FunnelModel,
        optim: OptimSpec,
        with_truth: bool = False,
        free: tuple[str, ...] = (),
        clip: bool = False,
    ):
        """``clip``: the Trainer clips gradients (optim.sparse_embeddings: auto then stays dense)."""
        super().__init__()
        self.model = model
        self.optim = optim
        self.names = model.graph.names
        self.choice = choose(optim, model, clip)  # sparse embedding updates or not, and why
        self.clip = clip
        # sparse embeddings: two optimisers (LazyAdam, Adam) stepped by hand
        self.automatic_optimization = not self.sparse
        self._epoch_keys: list[str] = []
        self._epoch_sum: Tensor | None = None
        self._epoch_rows = 0
        self.val_metrics = FunnelMetrics(model.graph, with_truth=with_truth, free=free)
        self.test_metrics = FunnelMetrics(model.graph, with_truth=with_truth, free=free)
        # the loss weighted by rows over the whole split (Lightning's own epoch mean under DDP
        # would be the unweighted mean of the ranks' means, and the shards differ in size)
        self.val_loss = WeightedMean()
        self.test_loss = WeightedMean()

    @property
    def sparse(self) -> bool:
        """Whether the embedding tables train with sparse gradients and LazyAdam (``self.choice``)."""
        return self.choice.sparse

    def forward(self, batch: dict[str, Tensor]):
        return self.model(batch)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        out = self.model(batch)
        loss = model_loss(self.model, out, batch[LABELS])
        bs = batch[LABELS].shape[0]
        self.log("train/loss", loss.total, prog_bar=True, on_step=True, on_epoch=False, batch_size=bs)
        # epoch means of the total and of every term, summed here and logged once per epoch:
        # one self.log per step instead of one per term (Lightning's per-call cost adds up)
        terms = {"": loss.total, **loss.parts, **loss.extra}
        values = torch.stack([v.detach().float() for v in terms.values()]) * bs
        if self._epoch_keys != list(terms):
            self._epoch_keys, self._epoch_sum, self._epoch_rows = list(terms), torch.zeros_like(values), 0
        self._epoch_sum += values
        self._epoch_rows += bs
        if not self.automatic_optimization:
            optimizers = self.optimizers()
            for opt in optimizers:
                opt.zero_grad()
            self.manual_backward(loss.total)
            optimizers[0].step()  # through Lightning: counts one global step per batch
            optimizers[1].optimizer.step()  # the raw torch optimiser: no second count
            for scheduler in self._schedulers():  # manual optimisation steps its schedulers too
                scheduler.step()
        logged = self.model.logged()  # e.g. MMoE/PLE: mean gate weight per expert
        if logged:  # every rank trains on as many rows: the mean of the ranks' means is the mean
            self.log_dict(logged, on_step=False, on_epoch=True, batch_size=bs, sync_dist=True)
        return loss.total

    def _schedulers(self) -> list:
        if not needs_scheduler(self.optim.schedule, self.optim.warmup_steps):
            return []
        found = self.lr_schedulers()
        return found if isinstance(found, list) else [found]

    def on_train_epoch_start(self) -> None:
        self._epoch_keys, self._epoch_sum, self._epoch_rows = [], None, 0

    def on_train_epoch_end(self) -> None:
        if not self._epoch_rows:
            return
        # summed over the ranks before dividing: a learned weighting (DWA) then sees the same
        # epoch losses on every rank and keeps the ranks' loss weights equal
        sums = torch.cat([self._epoch_sum, self._epoch_sum.new_tensor([self._epoch_rows])])
        sums = self.trainer.strategy.reduce(sums, reduce_op="sum") if self.trainer.world_size > 1 else sums
        means = (sums[:-1] / sums[-1]).tolist()
        epoch = {
            ("train/loss_epoch" if k == "" else f"train/loss/{k}"): v
            for k, v in zip(self._epoch_keys, means, strict=True)
        }
        self._log_same(epoch)
        weighting = self.model.weighting
        if not weighting.learned:
            return
        epoch_losses = {n: epoch[f"train/loss/{n}"] for n in self.names if f"train/loss/{n}" in epoch}
        if len(epoch_losses) == len(self.names):
            weighting.end_epoch(epoch_losses)
        self._log_same({f"weight/{k}": v for k, v in weighting.weights().items()})

    def _log_same(self, values: dict[str, float], prog_bar: bool = False) -> None:
        """Log epoch values that are already equal on every rank (computed from synchronised
        states). The max over ranks returns each one exactly (a mean could round it); without
        a sync at all Lightning warns under DDP."""
        self.log_dict(values, prog_bar=prog_bar, sync_dist=True, reduce_fx="max")

    def _eval_step(self, batch: dict[str, Tensor], metrics: FunnelMetrics, loss_mean: WeightedMean) -> None:
        out = self.model(batch)
        loss = model_loss(self.model, out, batch[LABELS])
        loss_mean.update(loss.total, batch[LABELS].shape[0])
        metrics.update(*out.log_stacked(self.names), batch[LABELS], truth_of(batch))

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, self.val_loss)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, self.test_loss)

    def _log_metrics(self, metrics: FunnelMetrics, loss_mean: WeightedMean, prefix: str) -> None:
        values = {"loss": float(loss_mean.compute()), **metrics.compute()}
        values["auc_mean"] = stage_auc_mean(values, self.names)
        metrics.reset()
        loss_mean.reset()
        shown = {f"{prefix}/{k}": v for k, v in values.items()}  # NaN where a space has one class
        headline = f"{prefix}/auc/{self.names[-1]}"
        self._log_same({headline: shown.pop(headline)}, prog_bar=True)
        self._log_same(shown)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics(self.val_metrics, self.val_loss, "val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics(self.test_metrics, self.test_loss, "test")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """What Lightning does not keep but an exact resume needs: the global torch RNG (dropout,
        feature dropout) and the loss history of a weighting that keeps one (DWA)."""
        history = getattr(self.model.weighting, "history", None)
        checkpoint["funnel"] = {"torch_rng": torch.get_rng_state(), "weighting_history": history}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("funnel") or {}
        if state.get("torch_rng") is not None:
            torch.set_rng_state(state["torch_rng"])
        if state.get("weighting_history") is not None and hasattr(self.model.weighting, "history"):
            self.model.weighting.history = [list(h) for h in state["weighting_history"]]

    def _tables(self) -> list[torch.nn.Embedding]:
        return [m for m in self.model.modules() if isinstance(m, torch.nn.Embedding)]

    def setup(self, stage: str) -> None:
        # sparse before Lightning wraps the model in DDP, which lays out its gradient buckets
        # (and all-reduces sparse gradients apart) by what the parameters give at that moment
        if stage == "fit" and self.trainer.is_global_zero:
            log.info(self.choice.message())
        if self.sparse:
            for m in self._tables():
                m.sparse = True

    def configure_optimizers(self):
        o = self.optim
        optimizers = self._optimizers()
        if not needs_scheduler(o.schedule, o.warmup_steps):
            return optimizers
        steps = self.trainer.estimated_stepping_batches  # every step of trainer.max_epochs
        listed = optimizers if isinstance(optimizers, list) else [optimizers]
        schedulers = [
            {"scheduler": build_scheduler(opt, o.schedule, steps, o.warmup_steps, o.min_lr_ratio), "interval": "step"}
            for opt in listed
        ]
        return listed, schedulers

    def _optimizers(self) -> torch.optim.Optimizer | list[torch.optim.Optimizer]:
        o = self.optim
        if self.sparse:
            for m in self._tables():
                m.sparse = True
            tables, dense = optimizer_params(self.model, o, self.clip)
            return [LazyAdam(tables, lr=o.lr), _fused(torch.optim.Adam, dense, lr=o.lr)]
        (params,) = optimizer_params(self.model, o, self.clip)
        # fused: one kernel over all parameters instead of a Python loop of small ops (same
        # arithmetic; CPU and CUDA both have it)
        if o.name == "adam":
            return _fused(torch.optim.Adam, params, lr=o.lr, weight_decay=o.weight_decay)
        if o.name == "adamw":
            return _fused(torch.optim.AdamW, params, lr=o.lr, weight_decay=o.weight_decay)
        if o.name == "adagrad":
            return torch.optim.Adagrad(params, lr=o.lr, weight_decay=o.weight_decay)
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


def optimizer_params(model: torch.nn.Module, optim: OptimSpec, clip: bool = False) -> list[list[torch.nn.Parameter]]:
    """The parameters of each optimiser ``configure_optimizers`` builds, in its order: with
    sparse embeddings the tables (LazyAdam) and the rest (Adam), else all of them. A warm start
    with ``init_optimizer`` reads the other run's optimiser state by it. ``clip``: as the
    module's (it can turn optim.sparse_embeddings: auto dense)."""
    params = list(model.parameters())
    if not choose(optim, model, clip).sparse:
        return [params]
    tables = [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    sparse_ids = {id(p) for p in tables}
    return [tables, [p for p in params if id(p) not in sparse_ids]]


def _fused(cls: type[torch.optim.Optimizer], params, **kwargs) -> torch.optim.Optimizer:
    """``cls(..., fused=True)`` where the device supports it, else the default implementation."""
    params = list(params)
    try:
        return cls(params, fused=True, **kwargs)
    except (RuntimeError, ValueError):
        return cls(params, **kwargs)
