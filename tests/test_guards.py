"""The divergence guard: non-finite and exploding losses stop training; a healthy, noisy one does not."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from funnel.training.guards import DivergenceGuard, TrainingDiverged


def feed(guard: DivergenceGuard, losses: list[float], trainer: SimpleNamespace | None = None) -> None:
    trainer = trainer or SimpleNamespace(current_epoch=0, global_step=0, world_size=1)
    for step, loss in enumerate(losses):
        trainer.global_step = step
        guard.on_train_batch_end(trainer, None, {"loss": torch.tensor(loss)}, None, step)
    guard.on_train_epoch_end(trainer, None)


def test_a_nan_loss_stops_with_a_lower_learning_rate_suggested():
    with pytest.raises(TrainingDiverged, match=r"the training loss is nan.*optim.lr \(now 10\), for example to 1\b"):
        feed(DivergenceGuard(lr=10.0), [0.7, 0.6, float("nan")])


def test_an_exploding_loss_stops_once_the_average_settles():
    # the shape of Adam at lr=10 on the tiny funnel: 1.0 at the start, then about 60 for ever
    guard = DivergenceGuard(lr=10.0)
    with pytest.raises(TrainingDiverged, match="rose from 1 to"):
        feed(guard, [1.0] + [60.0] * 30)
    assert guard.steps == guard.warmup  # judged at the first step after the warm-up


def test_a_healthy_noisy_loss_never_stops():
    rng = np.random.default_rng(0)
    losses = (0.7 * np.exp(-np.arange(500) / 100) + 0.1 + rng.normal(0, 0.05, 500)).clip(0.01).tolist()
    guard = DivergenceGuard(lr=1e-3)
    feed(guard, losses)
    assert guard.steps == 500 and math.isfinite(guard.best)


def test_a_small_loss_rising_tenfold_but_below_the_margin_is_not_divergence():
    feed(DivergenceGuard(lr=1e-3), [0.01] * 20 + [0.2] * 200)


def test_the_state_carries_the_losses_not_yet_read():
    guard = DivergenceGuard(lr=1e-3)
    feed(guard, [0.5] * 10)
    trainer = SimpleNamespace(current_epoch=1, global_step=10, world_size=1)
    guard.on_train_batch_end(trainer, None, {"loss": torch.tensor(0.4)}, None, 0)
    state = guard.state_dict()
    assert state["steps"] == 10 and state["pending"] == [pytest.approx(0.4)]
    again = DivergenceGuard(lr=1e-3)
    again.load_state_dict(state)
    again.on_train_epoch_end(trainer, None)
    assert again.steps == 11


def test_under_ddp_the_ranks_judge_the_mean_loss_and_stop_together():
    """Rank 0's own losses are fine; rank 1's last one is NaN. The guard averages across ranks
    (here a stand-in for the strategy's all-reduce), so rank 0 stops at the same step."""
    peer = torch.tensor([0.7, 0.6, float("nan")])

    def reduce(tensor: torch.Tensor, reduce_op: str) -> torch.Tensor:
        assert reduce_op == "mean"
        return (tensor + peer[: len(tensor)]) / 2

    strategy = SimpleNamespace(reduce=reduce, root_device=torch.device("cpu"))
    trainer = SimpleNamespace(current_epoch=0, global_step=0, world_size=2, strategy=strategy)
    with pytest.raises(TrainingDiverged, match="the training loss is nan"):
        feed(DivergenceGuard(lr=1.0), [0.7, 0.6, 0.5], trainer)
