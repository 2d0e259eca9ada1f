"""An exponential moving average of the weights (``optim.ema_decay``), validated and kept.

After every optimiser step the average moves towards the weights: ``avg += (1 - d) * (w - avg)``,
with ``d = min(ema_decay, (1 + n) / (10 + n))`` at the n-th update when ``ema_warmup`` is on
(the first weights fade within tens of steps, not thousands), ``d = ema_decay`` when it is off.
The arithmetic is that of ``torch.optim.swa_utils.get_ema_multi_avg_fn`` and Lightning's
``EMAWeightAveraging``; this callback differs from Lightning's in what it keeps, so that every
reader of a run gets the average without knowing about it:

- each validation runs on the average: it is swapped into the model when validation starts and
  stays there until the next training step, so the monitor, early stopping and the best
  checkpoint (``best.ckpt``: the weights alone) all see the average, and so do `funnel
  evaluate`, `predict`, `export` and warm starts, which read best.ckpt;
- ``last.ckpt`` holds the model as it was saved (the average, after a validation) and, in this
  callback's state, the other copy (the training weights) and the update count, so `fit
  --resume` trains on from the exact weights and average of the interrupted run;
- tables that train sparsely (lazy Adam, ``optim.sparse_embeddings``) are not averaged: a step
  touches a batch's rows, and averaging the whole table would cost a pass over every row at
  every step. They keep their trained rows; the dense parameters (towers, bottoms, heads and
  the tables that train densely) are averaged. Floating-point buffers (batch-norm statistics)
  are averaged with the parameters.
"""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

log = logging.getLogger(__name__)

WARMUP_BIAS = 10  # ema_warmup: d_n = (1 + n) / (WARMUP_BIAS + n), as TensorFlow's num_updates


def decay_at(decay: float, updates: int, warmup: bool) -> float:
    """The decay of update number ``updates`` (1 for the first update after the copy)."""
    return min(decay, (1 + updates) / (WARMUP_BIAS + updates)) if warmup else decay


def averaged_tensors(module: torch.nn.Module, skip: set[int]) -> list[Tensor]:
    """The parameters and floating-point buffers of ``module`` that the average covers, in a
    fixed order: all but those whose ``id`` is in ``skip`` (the tables that train sparsely)."""
    params = [p for p in module.parameters() if id(p) not in skip]
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    return params + buffers


class WeightAverage(pl.Callback):
    """Keeps the average of ``optim.ema_decay`` (see the module docstring); one per run."""

    def __init__(self, decay: float, warmup: bool = True):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.updates = 0  # updates since the copy of the first weights
        self.swapped = False  # the model holds the average, self._other the training weights
        self._other: list[Tensor] | None = None  # the average, or the training weights when swapped
        self._targets: list[Tensor] = []
        self._last_step = -1  # trainer.global_step at the last update (accumulated batches step once)
        self._loaded: dict[str, Any] | None = None  # a resumed run's state, until setup has the tensors

    @property
    def state_key(self) -> str:
        return "WeightAverage"

    # ---- the tensors -------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        skip = set()
        if getattr(pl_module, "sparse", False):
            skip = {id(m.weight) for m in pl_module.modules() if isinstance(m, torch.nn.Embedding)}
        self._targets = averaged_tensors(pl_module, skip)
        self._other = [t.detach().clone() for t in self._targets]
        if trainer.is_global_zero:
            log.info(
                "weight average: ema_decay %g%s over %d tensors (%s values)%s",
                self.decay,
                ", warm-up" if self.warmup else "",
                len(self._targets),
                f"{sum(t.numel() for t in self._targets):,}",
                "; the sparse tables keep their own rows" if skip else "",
            )
        if self._loaded is not None:
            self._restore(self._loaded)

    def _swap(self) -> None:
        assert self._other is not None
        with torch.no_grad():
            for target, other in zip(self._targets, self._other, strict=True):
                held = target.detach().clone()
                target.copy_(other)
                other.copy_(held)
        self.swapped = not self.swapped

    def _train_weights_in_place(self) -> None:
        if self.swapped:
            self._swap()

    # ---- the hooks ---------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._train_weights_in_place()  # after a validation: train on the training weights

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step == self._last_step or trainer.global_step == 0:
            return  # no optimiser step in this batch (gradient accumulation)
        self._last_step = trainer.global_step
        self.updates += 1
        d = decay_at(self.decay, self.updates, self.warmup)
        assert self._other is not None
        with torch.no_grad():
            torch._foreach_lerp_(self._other, [t.detach() for t in self._targets], 1.0 - d)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit" and self._other is not None and not self.swapped:
            self._swap()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._other is not None and not self.swapped:
            self._swap()  # the run ends on the average (what every checkpoint of it held)

    # ---- last.ckpt -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "updates": self.updates,
            "swapped": self.swapped,
            "last_step": self._last_step,
            "other": list(self._other or []),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = dict(state_dict)
        if self._other is not None:  # setup ran before the restore
            self._restore(self._loaded)

    def _restore(self, state: dict[str, Any]) -> None:
        other = state.get("other") or []
        if len(other) != len(self._targets) or any(
            o.shape != t.shape for o, t in zip(other, self._targets, strict=False)
        ):
            log.warning("weight average: the checkpoint's average does not fit this model: the average starts afresh")
            self._loaded = None
            return
        assert self._other is not None
        with torch.no_grad():
            for mine, saved in zip(self._other, other, strict=True):
                mine.copy_(saved)
        self.updates = int(state.get("updates", 0))
        self.swapped = bool(state.get("swapped", False))
        self._last_step = int(state.get("last_step", -1))
        self._loaded = None
