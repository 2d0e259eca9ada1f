"""Learning-rate schedules over the run's optimiser steps (``optim.schedule``).

A schedule is a factor on ``optim.lr`` per step: a linear warm-up over ``optim.warmup_steps``,
then ``constant`` (1), ``cosine`` (half a cosine from 1 down to ``optim.min_lr_ratio``) or
``linear`` (a straight line to it), both ending at the last step of ``trainer.max_epochs``. A
run stopped early by ``trainer.early_stopping`` ends somewhere on the way down.

The factor is a small callable object, so ``LambdaLR`` saves its numbers in the checkpoint
(plain ints and floats: ``--resume`` and ``weights_only=True`` loading both keep working).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCHEDULES = ("constant", "cosine", "linear")


@dataclass
class LrFactor:
    """The factor on the base learning rate after ``step`` optimiser steps."""

    schedule: str
    total_steps: int
    warmup_steps: int = 0
    min_ratio: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        done = min(1.0, (step - self.warmup_steps) / span)
        shape = 0.5 * (1.0 + math.cos(math.pi * done)) if self.schedule == "cosine" else 1.0 - done
        return self.min_ratio + (1.0 - self.min_ratio) * shape


def needs_scheduler(schedule: str, warmup_steps: int) -> bool:
    """A constant schedule without warm-up is no scheduler at all (the optimiser's own lr)."""
    return schedule != "constant" or warmup_steps > 0


def build_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, total_steps: int, warmup_steps: int, min_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    factor = LrFactor(schedule, max(1, int(total_steps)), int(warmup_steps), float(min_ratio))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
