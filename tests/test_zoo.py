"""The ablation baselines of the ESMM paper: ESMM-NS, DIVISION, NAIVE and BASE with oversampling."""

from __future__ import annotations

import json
import math
import uuid

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
    loss = ObservedLabelLoss(graph())(out, labels)
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
    kwargs = config_from_dict(_config({"type": "base", "oversample": 3})).funnel.model.kwargs
    assert kwargs == {"oversample": 3, "share_embeddings": False}  # the builder's defaults filled in


def test_flat_model_keys_of_earlier_releases_still_work_with_a_deprecation(caplog):
    cfg = config_from_dict(_config("base", oversample=3))
    assert cfg.funnel.model.type == "base" and cfg.funnel.model.kwargs == {"oversample": 3, "share_embeddings": False}
    assert "funnel.model: {type: base, oversample: 3}" in caplog.text


# Every registered model is tested: the parameter lists come from the registry.
MODEL_NAMES = MODELS.names()

# Private tables per tower, as in the paper (ESMM-NS, DIVISION, BASE, NAIVE); a model not
# listed is checked against its own share_embeddings default.
PRIVATE = {"esmm": False, "esmm_ns": True, "division": True, "base": True, "naive": True, "aitm": False}


def test_every_registered_model_is_parametrised():
    assert MODELS.names() == MODEL_NAMES
    assert set(PRIVATE) <= set(MODELS.names())


def _built(model: str):
    """The untrained model (seed 0) on the tiny synthetic data, with one batch of 64 rows."""
    from funnel.data.featurizer import Featurizer
    from funnel.data.sources import load_frames
    from funnel.data.table import take
    from funnel.models import create_model
    from funnel.runs import build_graph

    cfg = config_from_dict(_config(model))
    graph_ = build_graph(cfg)
    train = load_frames(cfg)["train"]
    feat = Featurizer(cfg, graph_).fit(train)
    torch.manual_seed(0)
    built = create_model(graph_, cfg.funnel, feat.layout())
    return cfg, built, take(feat.encode(train, "train").tensors(), slice(0, 64))


def check_model(model: str) -> None:
    """The forward check every registered model gets: a (B,) finite log-probability <= 0 per
    stage, path below conditional, a finite loss and finite gradients."""
    from funnel.models.registry import FunnelModel, model_loss

    _, built, batch = _built(model)
    assert isinstance(built, FunnelModel), model
    out = built(batch)
    for stage in built.graph.names:
        reach, cond = out.log_reach[stage], out.log_cond[stage]
        assert reach.shape == cond.shape == (64,), (model, stage)
        assert torch.isfinite(reach).all() and torch.isfinite(cond).all(), (model, stage)
        assert (reach <= 1e-6).all() and (cond <= 1e-6).all() and (reach <= cond + 1e-5).all(), (model, stage)
    loss = model_loss(built, out, batch["labels"])
    assert torch.isfinite(loss.total), model
    loss.total.backward()
    grads = [p.grad for p in built.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads), model


def check_model_trains(model: str, run_dir) -> None:
    cfg = config_from_dict({**_config(model), "run_dir": str(run_dir)})
    run = fit_config(cfg)
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("auc/click", "auc/conversion", "auc_cond/conversion", "auc_cond_es/conversion"):
        assert metrics[key] is not None and 0.0 < metrics[key] < 1.0, key
    assert math.isfinite(metrics["logloss/conversion"])


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_every_model_gives_finite_probabilities_losses_and_gradients(model):
    check_model(model)


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_every_model_trains_and_reports_every_metric(model, tmp_path):
    check_model_trains(model, tmp_path / "run")


def test_a_newly_registered_model_gets_the_same_checks_and_a_broken_one_fails_them(tmp_path):
    from funnel.models.registry import Capabilities, register_model
    from funnel.models.zoo import build_esmm

    name = f"tmp_model_{uuid.uuid4().hex[:8]}"
    assert name not in MODEL_NAMES

    def throwaway(graph, spec, layout):
        return build_esmm(graph, spec, layout)

    def broken(graph, spec, layout):  # NaN weights: NaN probabilities
        built = build_esmm(graph, spec, layout)
        with torch.no_grad():
            for p in built.parameters():
                p.fill_(float("nan"))
        return built

    try:
        register_model(name, capabilities=Capabilities(bottom=True, gradnorm=True))(throwaway)
        assert name in MODELS.names()  # what MODEL_NAMES holds when the registering module is imported first
        check_model(name)
        check_model_trains(name, tmp_path / "run")
        del MODELS._items[name]
        register_model(name)(broken)
        with pytest.raises(AssertionError, match=name):
            check_model(name)
    finally:
        MODELS._items.pop(name, None)
    assert MODELS.names() == MODEL_NAMES


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_which_models_share_the_embedding_tables(model):
    from funnel.models.registry import model_arguments

    cfg, built, _ = _built(model)
    shares = model_arguments(cfg.funnel).get("share_embeddings")
    private = PRIVATE.get(model, not shares)
    if shares is not None:  # the table agrees with the builder's default
        assert private is (not shares)
    net = built.net
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


def test_a_config_yaml_of_an_earlier_release_loads_unchanged(caplog):
    """Run directories written before models took arguments list every flat default."""
    old = {"share_embeddings": None, "oversample": 1.0, "transfer": None, "compose": None, "calibrator": 0.6}
    cfg = config_from_dict(_config("esmm", **old))
    assert cfg.funnel.model.type == "esmm" and cfg.funnel.model.kwargs["share_embeddings"] is True  # defaults filled
    assert "deprecated" not in caplog.text  # the defaults said nothing: nothing to warn about
    cfg = config_from_dict(_config("base", **{**old, "oversample": 2.0}))
    assert cfg.funnel.model.kwargs == {"oversample": 2.0, "share_embeddings": False} and "deprecated" in caplog.text
