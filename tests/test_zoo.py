"""The ablation baselines of the ESMM paper: ESMM-NS, DIVISION, NAIVE and BASE with oversampling."""

from __future__ import annotations

import json
import math

import pytest
import torch

from funnel.errors import ConfigError
from funnel.models import MODELS
from funnel.models.net import compose_direct
from funnel.models.zoo import ConditionalSubsetLoss, ObservedLabelLoss
from funnel.spec import config_from_dict
from funnel.training.fit import fit_config
from tests.test_losses import Y_CLICK, Y_CONV, A, B, batch, bce, graph, sigmoid


def test_division_path_probabilities_come_straight_from_the_towers_and_pcvr_is_their_clipped_ratio():
    logits, _ = batch()
    out = compose_direct(graph(), logits)
    reach, cond = out.stacked(["click", "conversion"])
    for i, (a, b) in enumerate(zip(A, B, strict=True)):
        assert reach[i, 0].item() == pytest.approx(sigmoid(a))
        assert reach[i, 1].item() == pytest.approx(sigmoid(b))  # pCTCVR from its own tower
        assert cond[i, 1].item() == pytest.approx(min(sigmoid(b) / sigmoid(a), 1.0))
    # row 3: pCTCVR sigmoid(0) = 0.5 > pCTR sigmoid(-3): the ratio is clipped at 1
    assert cond[3, 1].item() == 1.0


def test_naive_loss_treats_every_unclicked_impression_as_a_negative_conversion():
    logits, labels = batch()
    out = compose_direct(graph(), logits)  # NAIVE reads only the logits
    loss = ObservedLabelLoss(graph(weights=(1.0, 1.0)))(out, labels)
    want_click = sum(bce(sigmoid(a), y) for a, y in zip(A, Y_CLICK, strict=True)) / 4
    want_conv = sum(bce(sigmoid(b), y) for b, y in zip(B, Y_CONV, strict=True)) / 4  # all 4 rows, not the 2 clicked
    assert loss.parts["click"].item() == pytest.approx(want_click)
    assert loss.parts["conversion"].item() == pytest.approx(want_conv)


def test_base_oversampling_equals_duplicating_the_clicked_positives():
    logits, labels = batch()
    out = compose_direct(graph(), logits)
    weighted = ConditionalSubsetLoss(graph(), oversample=3.0)(out, labels)
    # duplicate row 0 (clicked, converted) twice more, then plain BASE
    idx = torch.tensor([0, 1, 2, 3, 0, 0])
    dup_logits = {k: v[idx] for k, v in logits.items()}
    duplicated = ConditionalSubsetLoss(graph())(compose_direct(graph(), dup_logits), labels[idx])
    assert weighted.parts["conversion"].item() == pytest.approx(duplicated.parts["conversion"].item())
    # the click tower is not oversampled: it trains on all impressions as before
    plain = ConditionalSubsetLoss(graph())(out, labels)
    assert weighted.parts["click"].item() == pytest.approx(plain.parts["click"].item())
    hand = (3 * bce(sigmoid(B[0]), 1.0) + bce(sigmoid(B[2]), 0.0)) / 4
    assert weighted.parts["conversion"].item() == pytest.approx(hand)


def _config(model: str, **funnel) -> dict:
    return {
        "data": {"synthetic": {"rows": 2000, "seed": 0}, "batch_size": 256},
        "features": [
            {"name": "user_id", "kind": "categorical"},
            {"name": "item_id", "kind": "categorical"},
            {"name": "price", "kind": "numeric", "transform": "log1p"},
        ],
        "funnel": {
            "model": model,
            "embed_dim": 4,
            "tower": {"type": "mlp", "hidden": [8]},
            "stages": [{"name": "click"}, {"name": "conversion", "after": "click"}],
            **funnel,
        },
        "trainer": {"fast_dev_run": True, "enable_progress_bar": False},
    }


def test_oversample_is_an_argument_of_base_only():
    with pytest.raises(ConfigError, match="funnel.model.oversample: model 'esmm' has no argument 'oversample'"):
        config_from_dict(_config({"type": "esmm", "oversample": 3}))
    assert config_from_dict(_config({"type": "base", "oversample": 3})).funnel.model.kwargs == {"oversample": 3}


def test_flat_model_keys_of_earlier_releases_still_work_with_a_deprecation(caplog):
    cfg = config_from_dict(_config("base", oversample=3))
    assert cfg.funnel.model.type == "base" and cfg.funnel.model.kwargs == {"oversample": 3}
    assert "funnel.model: {type: base, oversample: 3}" in caplog.text


@pytest.mark.parametrize("model", MODELS.names())
def test_every_model_trains_and_reports_every_metric(model, tmp_path):
    cfg = config_from_dict({**_config(model), "run_dir": str(tmp_path / "run")})
    run = fit_config(cfg)
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("auc/click", "auc/conversion", "auc_cond/conversion", "auc_cond_es/conversion"):
        assert metrics[key] is not None and 0.0 < metrics[key] < 1.0, key
    assert math.isfinite(metrics["logloss/conversion"])


@pytest.mark.parametrize(
    ("model", "private"), [("esmm", False), ("esmm_ns", True), ("division", True), ("base", True), ("naive", True)]
)
def test_which_models_share_the_embedding_tables(model, private):
    from funnel.data.featurizer import Featurizer
    from funnel.data.sources import load_frames
    from funnel.models import create_model
    from funnel.runs import build_graph

    cfg = config_from_dict(_config(model))
    graph_ = build_graph(cfg)
    feat = Featurizer(cfg, graph_).fit(load_frames(cfg)["train"])
    net = create_model(graph_, cfg.funnel, feat.layout()).net
    assert hasattr(net, "private") is private
    assert hasattr(net, "embeddings") is (not private)


def test_ait_unit_attends_over_the_transferred_and_own_representation():
    from funnel.models.transfer import AdaptiveTransfer

    torch.manual_seed(0)
    ait = AdaptiveTransfer(dim=6)
    z_prev, q = torch.randn(5, 6), torch.randn(5, 6)
    z = ait(z_prev, q)
    assert z.shape == (5, 6)
    w = ait.last_weights
    assert w.shape == (5, 2) and torch.allclose(w.sum(1), torch.ones(5))
    # by hand: u = [transfer(z_prev), q], w = softmax(<h2 u, h3 u>/sqrt(6)), z = sum w h1(u)
    u = torch.stack([ait.transfer(z_prev), q], 1)
    score = (ait.h2(u) * ait.h3(u)).sum(-1) / math.sqrt(6)
    want = (torch.softmax(score, 1).unsqueeze(-1) * ait.h1(u)).sum(1)
    assert torch.allclose(z, want, atol=1e-6)


def test_calibrator_is_alpha_times_the_mean_of_non_monotone_gaps():
    from funnel.models.zoo import EntireSpaceLoss

    logits, labels = batch()
    out = compose_direct(graph(), logits)  # path heads: conversion may exceed click
    plain = EntireSpaceLoss(graph())(out, labels)
    calibrated = EntireSpaceLoss(graph(), calibrator=0.6)(out, labels)
    gaps = [max(sigmoid(b) - sigmoid(a), 0.0) for a, b in zip(A, B, strict=True)]
    assert calibrated.extra["calibrator"].item() == pytest.approx(0.6 * sum(gaps) / 4)
    assert sum(calibrated.extra.values()).item() == pytest.approx(0.6 * sum(gaps) / 4)
    assert calibrated.parts["conversion"].item() == pytest.approx(plain.parts["conversion"].item())
    assert plain.extra == {}


def test_transfer_needs_towers_of_one_width():
    cfg = config_from_dict(
        {
            **_config("aitm"),
            "funnel": {
                **_config("aitm")["funnel"],
                "stages": [
                    {"name": "click", "tower": {"hidden": [8]}},
                    {"name": "conversion", "after": "click", "tower": {"hidden": [16]}},
                ],
            },
        }
    )
    from funnel.data.featurizer import Featurizer
    from funnel.data.sources import load_frames
    from funnel.models import create_model
    from funnel.runs import build_graph

    g = build_graph(cfg)
    feat = Featurizer(cfg, g).fit(load_frames(cfg)["train"])
    with pytest.raises(ConfigError, match="same output width"):
        create_model(g, cfg.funnel, feat.layout())


def test_transfer_options_are_refused_for_models_without_them():
    with pytest.raises(ConfigError, match="funnel.model.transfer: model 'base' has no argument 'transfer'"):
        config_from_dict(_config({"type": "base", "transfer": "ait"}))
