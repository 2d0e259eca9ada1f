"""optim.schedule: the learning-rate factor per step, by hand, and what a fit's optimisers end at."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from funnel.training.fit import fit
from funnel.training.schedule import LrFactor, needs_scheduler


def test_cosine_with_warmup_by_hand():
    f = LrFactor("cosine", total_steps=10, warmup_steps=2, min_ratio=0.0)
    assert [f(0), f(1)] == [0.5, 1.0]  # linear warm-up over 2 steps
    assert f(2) == 1.0  # the decay starts at the end of the warm-up
    assert f(6) == pytest.approx(0.5)  # half-way through the 8 decay steps: cos(pi/2)
    assert f(10) == pytest.approx(0.0) and f(50) == pytest.approx(0.0)  # the end, and after it


def test_linear_and_constant_and_a_floor():
    lin = LrFactor("linear", total_steps=8, min_ratio=0.1)
    assert [lin(0), lin(4), lin(8)] == pytest.approx([1.0, 0.55, 0.1])
    cos = LrFactor("cosine", total_steps=8, min_ratio=0.1)
    assert cos(2) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert LrFactor("constant", total_steps=8, warmup_steps=4)(1) == 0.5
    assert LrFactor("constant", total_steps=8, warmup_steps=4)(7) == 1.0
    assert not needs_scheduler("constant", 0) and needs_scheduler("constant", 3) and needs_scheduler("linear", 0)


def test_the_factor_survives_a_state_dict_round_trip():
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([w], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, LrFactor("cosine", 4))
    state = sched.state_dict()
    assert state["lr_lambdas"] == [{"schedule": "cosine", "total_steps": 4, "warmup_steps": 0, "min_ratio": 0.0}]


def _lrs(run, name: str) -> list[float]:
    with open(run / "logs" / "metrics.csv") as f:
        return [float(r[name]) for r in csv.DictReader(f) if r.get(name)]


def test_a_cosine_fit_logs_its_lr_each_epoch_and_ends_at_the_floor(base_config, write_config):
    base_config["optim"] |= {"schedule": "cosine", "min_lr_ratio": 0.1}
    base_config["trainer"] |= {"max_epochs": 2}
    run = fit(write_config(base_config))
    # the lr at the start of each epoch: 0.01, then half-way down the cosine (0.01 * 0.55)
    assert _lrs(run, "lr-Adam") == pytest.approx([0.01, 0.0055])
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert state["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.001)


def test_sparse_embeddings_step_both_schedulers(base_config, write_config):
    base_config["optim"] |= {"schedule": "linear", "warmup_steps": 3, "sparse_embeddings": True}
    base_config["trainer"] |= {"max_epochs": 1}
    run = fit(write_config(base_config))
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert [s["param_groups"][0]["lr"] for s in state["optimizer_states"]] == pytest.approx([0.0, 0.0], abs=1e-12)
    assert [s["last_epoch"] for s in state["lr_schedulers"]] == [state["global_step"]] * 2


def test_a_constant_schedule_keeps_the_plain_optimiser(base_config, write_config):
    run = fit(write_config(base_config))
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert state["lr_schedulers"] == [] and state["optimizer_states"][0]["param_groups"][0]["lr"] == 0.01
