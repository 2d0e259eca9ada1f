"""Training health: a stage stuck for two validation epochs is named with its part and a fix;
`funnel fit` ends with one learned / stuck / diverged line per stage, kept in run.json."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import funnel.training.fit as fit_module
from funnel.training.fit import fit
from funnel.training.health import TrainingHealth, summary_line

HEALTH = "funnel.training.health"


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == HEALTH and r.levelno == logging.WARNING]


def _health_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("health: ")]


def _with_dead_part(monkeypatch, kill) -> None:
    """Every model fit builds gets ``kill(net)`` applied (freezing part of it) before training."""
    real = fit_module.create_model

    def create_model(*args, **kwargs):
        model = real(*args, **kwargs)
        kill(model.net)
        return model

    monkeypatch.setattr(fit_module, "create_model", create_model)


def _zero_head(net) -> None:
    head = net.heads["m_conversion"]
    nn.init.zeros_(head.weight)
    head.weight.requires_grad_(False)  # the head outputs its (trained) bias alone: a constant


def _dead_relus(net) -> None:
    first = net.towers["m_conversion"].layers[0]
    nn.init.zeros_(first.weight)
    nn.init.constant_(first.bias, -1.0)  # every ReLU unit of the tower is off for every row
    for p in first.parameters():
        p.requires_grad_(False)


@pytest.mark.parametrize(
    ("kill", "part", "fix"),
    [
        (_zero_head, "the logit head of tower 'conversion'", "train the head"),
        (_dead_relus, "tower 'conversion' (all 8 ReLU units of its hidden layer 0 are inactive", "activation: gelu"),
    ],
)
def test_a_stuck_stage_warns_once_after_two_epochs_and_the_summary_says_stuck(
    base_config, write_config, monkeypatch, caplog, kill, part, fix
):
    _with_dead_part(monkeypatch, kill)
    base_config["trainer"]["max_epochs"] = 3
    caplog.set_level(logging.INFO)
    run = fit(write_config(base_config))
    (warning,) = _warnings(caplog)  # epochs 0 and 1 bad: one warning, not repeated at epoch 2
    assert "stage 'conversion' is not learning" in warning and "for 2 validation epochs" in warning
    assert part in warning and fix in warning
    assert json.loads((run / "run.json").read_text())["health"] == {"click": "learned", "conversion": "stuck"}
    lines = _health_lines(caplog)
    assert lines[0].startswith("health: stage 'click' learned (val/auc_cond/click 0.")
    assert lines[1].startswith("health: stage 'conversion' stuck (its conditional prediction")


def test_a_normal_tiny_run_learns_every_stage_without_a_warning(base_config, write_config, caplog):
    base_config["trainer"]["max_epochs"] = 2
    caplog.set_level(logging.INFO)
    run = fit(write_config(base_config))
    assert _warnings(caplog) == []
    assert json.loads((run / "run.json").read_text())["health"] == {"click": "learned", "conversion": "learned"}
    assert [line.split(" (")[0] for line in _health_lines(caplog)] == [
        "health: stage 'click' learned",
        "health: stage 'conversion' learned",
    ]


# ---- the callback alone, on stand-ins for the trainer and the module -------------------------


def _module(preds: dict[str, list[float]]) -> SimpleNamespace:
    """A module whose AUC metrics hold ``preds`` (view -> predictions) as their states."""
    metrics = {k.replace("/", "__"): SimpleNamespace(preds=[torch.tensor(v)]) for k, v in preds.items()}
    return SimpleNamespace(val_metrics=SimpleNamespace(metrics=metrics), device=torch.device("cpu"), model=None)


def _epoch(health: TrainingHealth, epoch: int, cond: list[float], auc_cond: float) -> None:
    module = _module({"auc/s": [0.1, 0.2, 0.3], "auc_cond/s": cond})
    trainer = SimpleNamespace(
        sanity_checking=False,
        world_size=1,
        is_global_zero=True,
        current_epoch=epoch,
        callback_metrics={"val/loss": torch.tensor(0.3), "val/auc/s": torch.tensor(0.7), "val/auc_cond/s": auc_cond},
    )
    health.on_validation_epoch_start(trainer, module)
    health.on_validation_epoch_end(trainer, module)
    health.on_validation_end(trainer, module)


GOOD, CONSTANT = [0.1, 0.4, 0.9], [0.25, 0.25, 0.25]


def test_one_bad_epoch_between_good_ones_does_not_warn(caplog):
    health = TrainingHealth(["s"])
    for epoch, (cond, auc) in enumerate([(CONSTANT, 0.5), (GOOD, 0.8), (GOOD, 0.5), (GOOD, 0.81)]):
        _epoch(health, epoch, cond, auc)
    assert _warnings(caplog) == []
    assert health.summary() == {"s": "learned"}


def test_two_bad_epochs_in_a_row_warn_once_naming_the_stage(caplog):
    health = TrainingHealth(["s"])
    for epoch, (cond, auc) in enumerate([(GOOD, 0.8), (GOOD, 0.5), (CONSTANT, 0.5), (CONSTANT, 0.5)]):
        _epoch(health, epoch, cond, auc)
    (warning,) = _warnings(caplog)
    assert warning.startswith("stage 's' is not learning: its conditional prediction is the constant 0.25")
    assert "(since epoch 1)" in warning and "Model part: the model's output for stage 's'" in warning
    assert health.summary() == {"s": "stuck"}


def test_non_finite_predictions_or_a_guard_stop_mean_diverged():
    health = TrainingHealth(["s"])
    _epoch(health, 0, [0.1, float("nan"), 0.3], 0.7)
    assert health.summary() == {"s": "diverged"}
    assert TrainingHealth(["s"]).summary(diverged=True) == {"s": "diverged"}
    assert TrainingHealth(["s"]).summary() == {"s": "unchecked"}  # no validation epoch ran


def test_the_state_survives_a_checkpoint():
    health = TrainingHealth(["s"])
    _epoch(health, 0, CONSTANT, 0.5)
    again = TrainingHealth(["s"])
    again.load_state_dict(health.state_dict())
    assert again.stages["s"].streak == 1 and again.epochs == 1


def test_the_summary_lines():
    learned = SimpleNamespace(auc_cond=0.8125, reason="", streak=0)
    stuck = SimpleNamespace(auc_cond=0.5, reason="its conditional prediction is the constant 0.25", streak=3)
    assert summary_line("a", "learned", learned, 3) == "health: stage 'a' learned (val/auc_cond/a 0.8125)"
    assert summary_line("b", "stuck", stuck, 3) == (
        "health: stage 'b' stuck (its conditional prediction is the constant 0.25, 3 of 3 validation epoch(s))"
    )
    assert summary_line("c", "diverged", stuck, 3).startswith("health: stage 'c' diverged (the loss")


# ---- the fix of the dead conditional tower: heads start at the base rates; centred bottoms -----


def test_bottom_experts_end_centred_and_train_on_a_one_row_batch():
    from funnel.models.bottoms import BatchCentre, MMoE
    from funnel.models.inputs import InputShape, TowerInput

    torch.manual_seed(0)
    flat = torch.randn(64, 5)
    shape = InputShape(flat_dim=5, field_dims={}, numeric_dim=5)
    bottom = MMoE(shape, ["a", "b"], experts=2, expert_hidden=[4], norm="batch")
    assert all(isinstance(net[-1], BatchCentre) for net in bottom.experts.nets)
    experts = bottom.experts(flat)  # (B, E, out): every expert's output has mean 0 over the rows
    torch.testing.assert_close(experts.mean(0), torch.zeros(2, 4), atol=1e-5, rtol=0)
    one = bottom(TowerInput(flat[:1], {}, flat[:1], {}))  # BatchNorm1d alone raises on one row
    assert one["a"].shape == (1, 4) and torch.isfinite(one["a"]).all()


def test_the_default_bottom_is_uncentred_and_a_bad_norm_is_refused():
    from funnel.models.bottoms import PLE, SharedBottom
    from funnel.models.inputs import InputShape

    shape = InputShape(flat_dim=5, field_dims={}, numeric_dim=5)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in SharedBottom(shape, ["a"], hidden=[4]).modules())
    assert any(isinstance(m, nn.BatchNorm1d) for m in PLE(shape, ["a"], expert_hidden=[4], norm="batch").modules())
    with pytest.raises(ValueError, match="norm must be one of batch, none, got 'layer'"):
        SharedBottom(shape, ["a"], norm="layer")


@pytest.mark.parametrize(("model", "second"), [("esmm", 0.25), ("division", 0.1)])
def test_heads_start_at_the_stage_base_rates(model, second):
    """Click on 40% of rows, conversion on 10% of all rows (25% of the clicked): ESMM's
    conversion head predicts the conditional rate, DIVISION's the path rate."""
    from funnel.data.featurizer import Featurizer
    from funnel.models.registry import create_model
    from funnel.runs import build_graph
    from funnel.spec import config_from_dict
    from funnel.synthetic import SyntheticSpec, generate
    from funnel.training.priors import init_head_priors

    raw = {
        "data": {"train": "unused.csv"},
        "features": [{"name": "user_id", "kind": "categorical"}, {"name": "price", "kind": "numeric"}],
        "funnel": {
            "model": model,
            "embed_dim": 4,
            "tower": {"type": "mlp", "hidden": [4]},
            "stages": [{"name": "click"}, {"name": "conversion", "after": "click"}],
        },
    }
    cfg = config_from_dict(raw)
    graph = build_graph(cfg)
    layout = Featurizer(cfg, graph).fit(generate(SyntheticSpec(rows=50, n_users=5, n_items=5))).layout()
    net = create_model(graph, cfg.funnel, layout)
    labels = torch.zeros(20, 2)
    labels[:8, 0] = 1  # 8 of 20 clicked
    labels[:2, 1] = 1  # 2 of them converted
    rates = init_head_priors(net, labels)
    assert rates == pytest.approx({"click": 0.4, "conversion": second})
    heads = net.net.heads
    assert torch.sigmoid(heads["m_click"].bias).item() == pytest.approx(0.4)
    assert torch.sigmoid(heads["m_conversion"].bias).item() == pytest.approx(second)
