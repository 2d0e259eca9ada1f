"""An exponential moving average of the weights (``optim.ema_decay``), validated and kept.

After every optimiser step the average moves towards the weights: ``avg += (1 - d) * (w - avg)``,
with ``d = min(ema_decay, (1 + n) / (10 + n))`` at the n-th update when ``ema_warmup`` is on
(the first weights fade within tens of steps, not thousands), ``d = ema_decay`` when it is off.
The update is the lerp of ``torch.optim.swa_utils.get_ema_multi_avg_fn`` and Lightning's
``EMAWeightAveraging``, the warm-up TensorFlow's ``num_updates`` ramp. This callback differs
from Lightning's in what it keeps, so that every reader of a run gets the average without
knowing about it:

- each validation runs on the average: it is swapped into the model when validation starts and
  stays there until the next training step, so the monitor, early stopping and the best
  checkpoint (``best.ckpt``: the weights alone) all see the average, and so do `funnel
  evaluate`, `predict`, `export` and warm starts, which read best.ckpt;
- ``last.ckpt`` holds the model as it was saved (the average, after a validation) and, in this
  callback's state, the average itself, the training weights it displaced and the update count,
  so `fit --resume` trains on from the exact weights and average of the interrupted run;
- the average is kept in float32 (or wider) whatever the model's precision: in bfloat16 a step
  of ``(1 - d) * (w - avg)`` is mostly rounded away;
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


def _master(t: Tensor) -> Tensor:
    """The average's copy of ``t``: float32 at least, so that a half-precision model's small
    steps are not rounded away (a bfloat16 ``avg + 0.005 * (w - avg)`` often equals ``avg``)."""
    t = t.detach()
    return t.clone() if t.dtype in (torch.float32, torch.float64) else t.float()


class WeightAverage(pl.Callback):
    """Keeps the average of ``optim.ema_decay`` (see the module docstring); one per run."""

    def __init__(self, decay: float, warmup: bool = True):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.updates = 0  # updates since the copy of the first weights
        self._average: list[Tensor] | None = None  # float32 or wider: the master copy
        self._held: list[Tensor] | None = None  # the training weights while the model holds the average
        self._targets: list[Tensor] = []
        self._upcast = False  # some targets are of a narrower dtype than their average
        self._last_step = -1  # trainer.global_step at the last update (accumulated batches step once)
        self._loaded: dict[str, Any] | None = None  # a resumed run's state, until setup has the tensors

    @property
    def state_key(self) -> str:
        return "WeightAverage"

    @property
    def swapped(self) -> bool:
        """Whether the model holds the average (after a validation, until the next step)."""
        return self._held is not None

    # ---- the tensors -------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        skip = set()
        if getattr(pl_module, "sparse", False):
            skip = {id(m.weight) for m in pl_module.modules() if isinstance(m, torch.nn.Embedding)}
        self._targets = averaged_tensors(pl_module, skip)
        self._average = [_master(t) for t in self._targets]
        self._upcast = any(t.dtype != a.dtype for t, a in zip(self._targets, self._average, strict=True))
        self._held = None
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

    def _use_average(self) -> None:
        assert self._average is not None and self._held is None
        with torch.no_grad():
            self._held = [t.detach().clone() for t in self._targets]
            for target, avg in zip(self._targets, self._average, strict=True):
                target.copy_(avg)

    def _use_training_weights(self) -> None:
        if self._held is None:
            return
        with torch.no_grad():
            for target, held in zip(self._targets, self._held, strict=True):
                target.copy_(held)
        self._held = None

    # ---- the hooks ---------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._use_training_weights()  # after a validation: train on the training weights

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step == self._last_step or trainer.global_step == 0:
            return  # no optimiser step in this batch (gradient accumulation)
        self._last_step = trainer.global_step
        self.updates += 1
        d = decay_at(self.decay, self.updates, self.warmup)
        assert self._average is not None
        weights = self._targets  # a half-precision model's weights, upcast to the average's dtype
        if self._upcast:
            weights = [t.to(a.dtype) for t, a in zip(self._targets, self._average, strict=True)]
        with torch.no_grad():
            torch._foreach_lerp_(self._average, weights, 1.0 - d)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit" and self._average is not None and not self.swapped:
            self._use_average()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._average is not None and not self.swapped:
            self._use_average()  # the run ends on the average (what every checkpoint of it held)

    # ---- last.ckpt -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "updates": self.updates,
            "last_step": self._last_step,
            "average": list(self._average or []),
            "held": list(self._held) if self._held is not None else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = dict(state_dict)
        if self._average is not None:  # setup ran before the restore
            self._restore(self._loaded)

    def _restore(self, state: dict[str, Any]) -> None:
        self._loaded = None
        average, held = state.get("average") or [], state.get("held")
        if not self._fits(average) or (held is not None and not self._fits(held)):
            log.warning("weight average: the checkpoint's average does not fit this model: the average starts afresh")
            return
        assert self._average is not None
        with torch.no_grad():
            for mine, saved in zip(self._average, average, strict=True):
                mine.copy_(saved)
        # the model was restored as saved: the average after a validation, the training weights
        # (held) in this state; the next training step puts them back
        self._held = [h.clone() for h in held] if held is not None else None
        self.updates = int(state.get("updates", 0))
        self._last_step = int(state.get("last_step", -1))

    def _fits(self, tensors: list[Tensor]) -> bool:
        return len(tensors) == len(self._targets) and all(
            s.shape == t.shape for s, t in zip(tensors, self._targets, strict=True)
        )
