"""Tests for the ESMM and BASE objectives and the log-space BCE they rest on."""

from __future__ import annotations

import math

import pytest
import torch

from funnel.graph import FunnelGraph
from funnel.models.losses import bce_from_log_prob, log1mexp, masked_mean
from funnel.models.net import compose
from funnel.models.weighting import StaticWeighting
from funnel.models.zoo import ConditionalSubsetLoss, EntireSpaceLoss

# A hand-made batch of 4 impressions: click and conversion logits and labels.
A = [2.0, -1.0, 0.5, -3.0]  # click logits
B = [0.3, 1.5, -2.0, 0.0]  # conversion | click logits
Y_CLICK = [1.0, 0.0, 1.0, 0.0]
Y_CONV = [1.0, 0.0, 0.0, 0.0]


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def bce(p: float, y: float) -> float:
    return -(y * math.log(p) + (1.0 - y) * math.log(1.0 - p))


def graph() -> FunnelGraph:
    return FunnelGraph.chain([("click", "click", None), ("conversion", "conversion", "click")])


def weighted(result, weights=None) -> torch.Tensor:
    """The run's total: the static weighting of the (unweighted) stage terms plus the others."""
    names = list(result.parts)
    w = list(weights) if weights is not None else [1.0, 2.0][: len(names)] + [1.0] * (len(names) - 2)
    return StaticWeighting(names, w)(result.parts) + sum(result.extra.values())


def batch(a=A, b=B, dtype=torch.float64):
    logits = {
        "click": torch.tensor(a, dtype=dtype, requires_grad=True),
        "conversion": torch.tensor(b, dtype=dtype, requires_grad=True),
    }
    labels = torch.tensor([Y_CLICK, Y_CONV], dtype=dtype).T  # (4, 2)
    return logits, labels


def test_entire_space_loss_equals_the_hand_computed_value():
    logits, labels = batch()
    result = EntireSpaceLoss(graph())(compose(graph(), logits), labels)

    ctr = [sigmoid(a) for a in A]
    ctcvr = [sigmoid(a) * sigmoid(b) for a, b in zip(A, B, strict=True)]
    click = sum(bce(p, y) for p, y in zip(ctr, Y_CLICK, strict=True)) / 4
    conversion = sum(bce(p, y) for p, y in zip(ctcvr, Y_CONV, strict=True)) / 4

    assert set(result.parts) == {"click", "conversion"}
    assert result.parts["click"].item() == pytest.approx(click, rel=1e-12)
    assert result.parts["conversion"].item() == pytest.approx(conversion, rel=1e-12)
    assert weighted(result).item() == pytest.approx(1 * click + 2 * conversion, rel=1e-12)
    assert result.total is None  # the objective leaves weighting to the run's one weighting


def test_entire_space_loss_has_no_term_on_pcvr_alone():
    """The conversion part is the BCE of the path pCTCVR, not of pCVR on clicked rows."""
    logits, labels = batch()
    result = EntireSpaceLoss(graph())(compose(graph(), logits), labels)
    pcvr_on_clicked = (bce(sigmoid(B[0]), Y_CONV[0]) + bce(sigmoid(B[2]), Y_CONV[2])) / 2
    pcvr_on_all = sum(bce(sigmoid(b), y) for b, y in zip(B, Y_CONV, strict=True)) / 4
    assert list(result.parts) == ["click", "conversion"]
    for value in (pcvr_on_clicked, pcvr_on_all):
        assert result.parts["conversion"].item() != pytest.approx(value, rel=1e-3)


def test_entire_space_loss_trains_the_conditional_tower_on_every_impression():
    logits, labels = batch()
    weighted(EntireSpaceLoss(graph())(compose(graph(), logits), labels)).backward()
    assert (logits["conversion"].grad.abs() > 1e-6).all()  # unclicked rows included
    assert (logits["click"].grad.abs() > 1e-6).all()


def test_conditional_subset_loss_equals_the_hand_computed_value():
    logits, labels = batch()
    result = ConditionalSubsetLoss(graph())(compose(graph(), logits), labels)

    click = sum(bce(sigmoid(a), y) for a, y in zip(A, Y_CLICK, strict=True)) / 4
    clicked = [i for i, y in enumerate(Y_CLICK) if y == 1]  # rows 0 and 2
    conversion = sum(bce(sigmoid(B[i]), Y_CONV[i]) for i in clicked) / len(clicked)

    assert result.parts["click"].item() == pytest.approx(click, rel=1e-12)
    assert result.parts["conversion"].item() == pytest.approx(conversion, rel=1e-12)
    assert weighted(result).item() == pytest.approx(click + 2 * conversion, rel=1e-12)


def test_conditional_subset_loss_gives_no_gradient_from_unclicked_rows():
    logits, labels = batch()
    weighted(ConditionalSubsetLoss(graph())(compose(graph(), logits), labels)).backward()
    grad = logits["conversion"].grad
    assert grad[1].item() == 0.0 and grad[3].item() == 0.0  # click = 0
    assert abs(grad[0].item()) > 1e-6 and abs(grad[2].item()) > 1e-6
    # hand value for row 0: d/db of (2 / 2) * BCE(sigmoid(b), 1) = sigmoid(b) - 1
    assert grad[0].item() == pytest.approx(sigmoid(B[0]) - 1.0, rel=1e-12)


def test_conditional_subset_loss_without_clicks_is_zero_not_nan():
    logits, _ = batch()
    labels = torch.zeros(4, 2, dtype=torch.float64)
    result = ConditionalSubsetLoss(graph())(compose(graph(), logits), labels)
    assert result.parts["conversion"].item() == 0.0
    weighted(result).backward()
    assert torch.isfinite(logits["conversion"].grad).all()


@pytest.mark.parametrize("objective", [EntireSpaceLoss, ConditionalSubsetLoss])
@pytest.mark.parametrize("magnitude", [50.0, 100.0])
def test_extreme_logits_give_finite_loss_and_gradients(objective, magnitude):
    m = magnitude
    a = [m, -m, m, -m]
    b = [m, m, -m, -m]
    logits, labels = batch(a, b, dtype=torch.float32)
    labels = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0], [0.0, 0.0]])  # wrong and right answers
    result = objective(graph())(compose(graph(), logits), labels)
    total = weighted(result)
    assert torch.isfinite(total)
    total.backward()
    for t in logits.values():
        assert torch.isfinite(t.grad).all()
    assert total.item() > 10  # confidently wrong rows cost a lot, not 0


def test_path_probability_near_1e_minus_12_is_finite_and_exact():
    g = FunnelGraph.chain([("a", "a", None), ("b", "b", "a"), ("c", "c", "b")])
    logits = {n: torch.full((2,), -9.2, requires_grad=True) for n in ("a", "b", "c")}
    labels = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    out = compose(g, logits)
    log_p = 3 * math.log(sigmoid(-9.2))
    assert math.exp(log_p) == pytest.approx(1.03e-12, rel=0.01)
    assert out.log_reach["c"][0].item() == pytest.approx(log_p, rel=1e-6)

    result = EntireSpaceLoss(g)(out, labels)
    # row 0 (label 1): -log p; row 1 (label 0): -log(1 - p), about 1e-12
    expected = (-log_p - math.log1p(-math.exp(log_p))) / 2
    assert result.parts["c"].item() == pytest.approx(expected, rel=1e-5)
    weighted(result).backward()
    for t in logits.values():
        assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


@pytest.mark.parametrize("x", [-1e-8, -0.1, -0.69, -0.7, -5.0, -40.0])
def test_log1mexp_matches_the_direct_formula(x):
    expected = math.log(1.0 - math.exp(x))
    got = log1mexp(torch.tensor(x, dtype=torch.float64)).item()
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-15)
    got32 = log1mexp(torch.tensor(x, dtype=torch.float32)).item()
    assert got32 == pytest.approx(math.log(-math.expm1(x)), rel=1e-5, abs=1e-12)


def test_log1mexp_is_finite_with_finite_gradient_at_zero():
    x = torch.tensor([0.0, -1e-40, -1e-8, -50.0], requires_grad=True)
    y = log1mexp(x)
    assert torch.isfinite(y).all()
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_bce_from_log_prob_matches_plain_bce():
    p = torch.tensor([0.1, 0.5, 0.9, 0.3], dtype=torch.float64)
    y = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    expected = [bce(pi, yi) for pi, yi in zip(p.tolist(), y.tolist(), strict=True)]
    assert bce_from_log_prob(p.log(), y).tolist() == pytest.approx(expected, rel=1e-12)


def test_masked_mean_averages_only_masked_rows():
    values = torch.tensor([1.0, 2.0, 3.0, 10.0])
    assert masked_mean(values, torch.tensor([True, False, True, False])).item() == 2.0
    assert masked_mean(values, torch.zeros(4, dtype=torch.bool)).item() == 0.0
