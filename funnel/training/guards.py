"""Callbacks that stop a training run that cannot end well, with a message that says why.

``DivergenceGuard`` stops at a non-finite training loss, or when the loss, smoothed over steps,
rises far above the best it reached (Adam with a learning rate of 10 does both).
"""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch

from funnel.errors import UserError


class TrainingDiverged(UserError):
    """The training loss became non-finite or exploded: the optimiser settings are to blame."""


class DivergenceGuard(pl.Callback):
    """Raise :class:`TrainingDiverged` when training diverges.

    The loss is smoothed with an exponential moving average (``smoothing`` per step) from the
    first step on. From step ``warmup`` on, a smoothed loss more than ``factor`` times its lowest
    value and more than ``margin`` nats above it counts as divergence: far beyond the noise of a
    healthy run, whose loss falls or stays level."""

    def __init__(
        self,
        lr: float,
        factor: float = 10.0,
        margin: float = 1.0,
        smoothing: float = 0.05,
        warmup: int = 20,
        every: int = 8,
    ):
        self.lr = lr
        self.factor, self.margin, self.smoothing, self.warmup = factor, margin, smoothing, warmup
        self.every = every  # losses are read from the device in groups: one sync per `every` steps
        self.ema: float | None = None
        self.best = math.inf
        self.steps = 0
        self._pending: list[torch.Tensor] = []

    def _fail(self, trainer: pl.Trainer, what: str) -> None:
        lower = f"{self.lr / 10:g}"
        raise TrainingDiverged(
            f"training diverged at epoch {trainer.current_epoch}, step {trainer.global_step}: {what}. "
            f"Lower optim.lr (now {self.lr:g}), for example to {lower}; gradient clipping "
            "(trainer.gradient_clip_val: 1.0) also helps."
        )

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        self._pending.append(loss.detach().float().reshape(()))
        if len(self._pending) >= self.every:
            self._check(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer)

    def _check(self, trainer: pl.Trainer) -> None:
        """Judge the pending losses. Under DDP every rank checks after the same steps (they run as
        many batches), so the losses are averaged across ranks first: all ranks see the loss of the
        whole batch and stop together (a NaN on one rank makes the mean NaN everywhere)."""
        pending = torch.stack(self._pending) if self._pending else torch.zeros(0)
        if trainer.world_size > 1:
            pending = trainer.strategy.reduce(pending.to(trainer.strategy.root_device), reduce_op="mean")
        values = pending.tolist()
        self._pending = []
        for value in values:
            self._observe(trainer, value)

    def _observe(self, trainer: pl.Trainer, value: float) -> None:
        if not math.isfinite(value):
            best = f" (its smoothed best was {self.best:.4g})" if math.isfinite(self.best) else ""
            self._fail(trainer, f"the training loss is {value}{best}")
        self.steps += 1
        self.ema = value if self.ema is None else (1 - self.smoothing) * self.ema + self.smoothing * value
        self.best = min(self.best, self.ema)
        if self.steps < self.warmup:  # judged only once the average has settled
            return
        if self.ema > self.factor * self.best and self.ema - self.best > self.margin:
            self._fail(trainer, f"the smoothed training loss rose from {self.best:.4g} to {self.ema:.4g}")

    def state_dict(self) -> dict[str, Any]:
        pending = torch.stack(self._pending).tolist() if self._pending else []
        return {"ema": self.ema, "best": self.best, "steps": self.steps, "pending": pending}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.ema, self.best, self.steps = state_dict["ema"], state_dict["best"], state_dict["steps"]
        self._pending = [torch.tensor(v) for v in state_dict.get("pending", [])]
