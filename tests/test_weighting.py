"""Dynamic loss weighting: static, uncertainty (Kendall 2018) and DWA (Liu 2019)."""

from __future__ import annotations

import math

import pytest
import torch

from funnel.errors import ConfigError
from funnel.models.weighting import DWAWeighting, StaticWeighting, UncertaintyWeighting
from funnel.spec import config_from_dict

NAMES = ["click", "conversion"]


def test_static_weighting_is_the_weighted_sum():
    w = StaticWeighting(NAMES, [1.0, 3.0])
    total = w({"click": torch.tensor(0.5), "conversion": torch.tensor(0.25)})
    assert total.item() == pytest.approx(0.5 + 3 * 0.25)


def test_uncertainty_weighting_value_and_direction():
    w = UncertaintyWeighting(NAMES, [1.0, 1.0])
    with torch.no_grad():
        w.log_var.copy_(torch.tensor([0.5, -0.2]))
    parts = {"click": torch.tensor(0.4), "conversion": torch.tensor(2.0)}
    want = math.exp(-0.5) * 0.4 + 0.5 + math.exp(0.2) * 2.0 - 0.2
    assert w(parts).item() == pytest.approx(want, rel=1e-6)
    # on fixed losses the optimum is s_k = log L_k: the low-loss stage gains weight, the high-loss one loses it
    w = UncertaintyWeighting(NAMES, [1.0, 1.0])
    opt = torch.optim.SGD(w.parameters(), lr=0.1)
    losses = {"click": torch.tensor(0.1), "conversion": torch.tensor(2.0)}
    for _ in range(300):
        opt.zero_grad()
        w(losses).backward()
        opt.step()
    weights = w.weights()
    assert weights["click"] > 1.0 > weights["conversion"]
    assert w.log_var.detach().tolist() == pytest.approx([math.log(0.1), math.log(2.0)], abs=0.05)


def test_dwa_weights_follow_the_hand_computed_softmax_of_loss_ratios():
    w = DWAWeighting(NAMES, [1.0, 1.0], temperature=2.0)
    w.end_epoch({"click": 0.4, "conversion": 0.2})
    assert w.weights() == {"click": 1.0, "conversion": 1.0}  # one epoch of history: equal weights
    w.end_epoch({"click": 0.36, "conversion": 0.1})  # click falls slowly (0.9), conversion fast (0.5)
    e1, e2 = math.exp(0.9 / 2), math.exp(0.5 / 2)
    assert w.weights()["click"] == pytest.approx(2 * e1 / (e1 + e2), rel=1e-6)
    assert w.weights()["click"] > 1.0 > w.weights()["conversion"]
    assert sum(w.weights().values()) == pytest.approx(2.0)


@pytest.mark.parametrize("method", ["static", "uncertainty", "dwa", "gradnorm"])
def test_every_weighting_method_trains_end_to_end_and_logs_weights(method, tmp_path):
    import csv

    from funnel.training.fit import fit_config

    cfg = config_from_dict(
        {
            "run_dir": str(tmp_path / "run"),
            "data": {"synthetic": {"rows": 3000, "seed": 0}, "batch_size": 512},
            "features": [{"name": "user_id", "kind": "categorical"}, {"name": "price", "kind": "numeric"}],
            "funnel": {
                "loss_weighting": {"method": method},
                "embed_dim": 4,
                "tower": {"hidden": [8]},
                "stages": [{"name": "click"}, {"name": "conversion", "after": "click"}],
            },
            "trainer": {"max_epochs": 3, "enable_progress_bar": False, "log_every_n_steps": 1},
        }
    )
    run = fit_config(cfg)
    with open(run / "logs" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    logged = [r for r in rows if r.get("weight/click")]
    if method == "static":
        assert not logged
    else:
        assert len(logged) == 3
        assert all(math.isfinite(float(r["weight/conversion"])) for r in logged)


def test_unknown_weighting_method_is_a_config_error():
    with pytest.raises(ConfigError, match='Did you mean "uncertainty"'):
        config_from_dict(
            {
                "data": {"train": "t.csv"},
                "features": [{"name": "u", "kind": "categorical"}],
                "funnel": {"loss_weighting": {"method": "uncertainty_"}, "stages": [{"name": "click"}]},
            }
        )


def test_gradnorm_gives_more_weight_to_the_stage_with_smaller_gradients_on_the_shared_table():
    from funnel.models.weighting import GradNormWeighting

    torch.manual_seed(0)
    shared = torch.nn.Parameter(torch.ones(3))
    w = GradNormWeighting(NAMES, [1.0, 1.0], alpha=1.5)
    w.shared = [shared]
    opt = torch.optim.SGD(w.parameters(), lr=0.05)
    for _ in range(50):
        opt.zero_grad()
        # both losses are 1.0 with the same history, but click's gradient on the table is 10x conversion's
        parts = {"click": shared.sum() / 3.0, "conversion": shared.sum() / 30.0 + 0.9}
        w(parts).backward()
        opt.step()
    weights = w.weights()
    assert weights["conversion"] > 1.0 > weights["click"]
    assert sum(weights.values()) == pytest.approx(2.0)


def test_gradnorm_is_a_plain_weighted_sum_without_gradients():
    from funnel.models.weighting import GradNormWeighting

    w = GradNormWeighting(NAMES, [1.0, 2.0])
    w.shared = [torch.nn.Parameter(torch.ones(2))]
    with torch.no_grad():
        total = w({"click": torch.tensor(0.5), "conversion": torch.tensor(0.25)})
    assert total.item() == pytest.approx(0.5 + 2 * 0.25)


def test_epoch_losses_are_the_batch_weighted_means_of_the_step_losses(tmp_path):
    """Per-term losses are summed in the step and logged once per epoch (one self.log per step)."""
    import csv

    from funnel.training.fit import fit_config

    cfg = config_from_dict(
        {
            "run_dir": str(tmp_path / "run"),
            "data": {"synthetic": {"rows": 3000, "seed": 0}, "batch_size": 700},  # 2400 rows: 700, 700, 700, 300
            "features": [{"name": "user_id", "kind": "categorical"}],
            "funnel": {
                "embed_dim": 4,
                "tower": {"hidden": [8]},
                "stages": [{"name": "click"}, {"name": "conversion", "after": "click"}],
            },
            "trainer": {"max_epochs": 1, "enable_progress_bar": False, "log_every_n_steps": 1},
        }
    )
    run = fit_config(cfg)
    with open(run / "logs" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    steps = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    (epoch,) = [r for r in rows if r.get("train/loss_epoch")]
    assert len(steps) == 4
    want = (700 * sum(steps[:3]) + 300 * steps[3]) / 2400
    assert float(epoch["train/loss_epoch"]) == pytest.approx(want, rel=1e-5)
    assert float(epoch["train/loss/click"]) + float(epoch["train/loss/conversion"]) == pytest.approx(want, rel=1e-5)


def test_fused_adam_takes_the_same_steps_as_the_default_adam():
    from funnel.training.module import _fused

    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Embedding(50, 4), torch.nn.Flatten(), torch.nn.Linear(12, 1))
    b = __import__("copy").deepcopy(a)
    fused, plain = _fused(torch.optim.Adam, a.parameters(), lr=0.01), torch.optim.Adam(b.parameters(), lr=0.01)
    assert fused.defaults["fused"] is True
    x = torch.randint(0, 50, (32, 3))
    for _ in range(5):
        for model, opt in ((a, fused), (b, plain)):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_a_checkpoint_without_the_static_weights_loads_them_from_the_config():
    """Static runs written before every model had a weighting module have no `static` buffer."""
    from funnel.models.weighting import StaticWeighting

    w = StaticWeighting(["click", "conversion"], [1.0, 3.0])
    missing, unexpected = w.load_state_dict({}, strict=False)
    assert missing == [] and unexpected == []
    assert w.static.tolist() == [1.0, 3.0]
