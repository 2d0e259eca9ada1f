"""ESCM² counterfactual regularisers: IPS and DR values, and no gradient into the propensity."""

from __future__ import annotations

import pytest
import torch

from funnel.errors import ConfigError
from funnel.models.counterfactual import build_regularizer
from funnel.models.inputs import TowerInput
from funnel.models.net import compose
from funnel.spec import config_from_dict
from tests.test_losses import Y_CLICK, Y_CONV, A, B, batch, bce, graph, sigmoid


def test_ips_is_the_clicked_rows_bce_over_the_clipped_detached_propensity_averaged_over_all_rows():
    logits, labels = batch()
    reg = build_regularizer(graph(), "ips", weight=0.5, clip=0.2, stages=(), input_dim=3)
    terms = reg(compose(graph(), logits), labels)
    want = (
        sum(yc * bce(sigmoid(b), yv) / max(sigmoid(a), 0.2) for a, b, yc, yv in zip(A, B, Y_CLICK, Y_CONV, strict=True))
        / 4
    )
    assert set(terms) == {"ips/conversion"}
    assert terms["ips/conversion"].item() == pytest.approx(0.5 * want)


@pytest.mark.parametrize("method", ["ips", "dr"])
def test_the_propensity_tower_gets_exactly_zero_gradient_from_the_regulariser(method):
    logits, labels = batch()
    out = compose(graph(), logits)
    out.inputs = TowerInput(
        flat=torch.randn(4, 3, dtype=torch.float64), fields={}, numeric=torch.zeros(4, 0), sequences={}
    )
    reg = build_regularizer(graph(), method, weight=1.0, clip=0.05, stages=(), input_dim=3).double()
    # the 0·click term only makes click's gradient a tensor; any leak through P̂ would add to it
    (sum(reg(out, labels).values()) + 0.0 * logits["click"].sum()).backward()
    assert torch.equal(logits["click"].grad, torch.zeros(4, dtype=torch.float64))  # propensity: untouched
    assert logits["conversion"].grad.abs().sum() > 0  # the conditional tower is what gets corrected


def test_dr_value_and_its_imputation_loss_by_hand():
    logits, labels = batch()
    out = compose(graph(), logits)
    flat = torch.randn(4, 3, dtype=torch.float64)
    out.inputs = TowerInput(flat=flat, fields={}, numeric=torch.zeros(4, 0), sequences={})
    reg = build_regularizer(graph(), "dr", weight=1.0, clip=0.05, stages=(), input_dim=3).double()
    terms = reg(out, labels)
    e_hat = reg.imputation["m_conversion"](flat).squeeze(-1).tolist()
    dr = imp = 0.0
    for i, (a, b, yc, yv) in enumerate(zip(A, B, Y_CLICK, Y_CONV, strict=True)):
        e, p = bce(sigmoid(b), yv), max(sigmoid(a), 0.05)
        dr += e_hat[i] + yc * (e - e_hat[i]) / p
        imp += yc * (e - e_hat[i]) ** 2 / p
    assert terms["dr/conversion"].item() == pytest.approx(dr / 4)
    assert terms["dr_imputation/conversion"].item() == pytest.approx(imp / 4)


def _raw(**cf):
    return {
        "data": {"synthetic": {"rows": 2000}},
        "features": [{"name": "user_id", "kind": "categorical"}, {"name": "price", "kind": "numeric"}],
        "funnel": {
            "embed_dim": 4,
            "tower": {"hidden": [8]},
            "counterfactual": cf,
            "stages": [{"name": "click"}, {"name": "conversion", "after": "click"}],
        },
        "trainer": {"fast_dev_run": True, "enable_progress_bar": False},
    }


def test_regularised_stage_must_be_a_conditional_stage():
    with pytest.raises(ConfigError) as err:
        config_from_dict(_raw(method="ips", stages=["click", "convrsion"]))
    msg = str(err.value)
    assert "'click' follows the impression" in msg and 'Did you mean "conversion"?' in msg


@pytest.mark.parametrize("method", ["ips", "dr"])
def test_regularised_esmm_trains_and_logs_the_terms(method, tmp_path):
    from funnel.training.fit import fit_config

    cfg = config_from_dict({**_raw(method=method), "run_dir": str(tmp_path / "run")})
    run = fit_config(cfg)
    assert (run / "metrics.json").is_file()


def test_dr_needs_shared_embeddings():
    from funnel.data.featurizer import Featurizer
    from funnel.data.sources import load_frames
    from funnel.models import create_model
    from funnel.runs import build_graph

    raw = _raw(method="dr")
    raw["funnel"]["model"] = "base"
    with pytest.raises(ConfigError, match="dr imputes errors from the shared embeddings"):
        config_from_dict(raw)  # the model's declared capabilities, before any data is read
    raw["funnel"]["model"] = {"type": "base", "share_embeddings": True}
    cfg = config_from_dict(raw)
    g = build_graph(cfg)
    feat = Featurizer(cfg, g).fit(load_frames(cfg)["train"])
    assert create_model(g, cfg.funnel, feat.layout()).regularizer is not None
