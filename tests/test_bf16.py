"""bf16-mixed training (trainer.precision=bf16-mixed, i.e. CPU autocast to bfloat16): the towers run
in bfloat16, the heads, the funnel composition and the loss in float32, finite at extreme logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from funnel.data.featurizer import Featurizer
from funnel.data.table import LABELS, take
from funnel.models import create_model
from funnel.models.net import compose
from funnel.runs import build_graph
from funnel.spec import config_from_dict
from funnel.synthetic import SyntheticSpec, generate

RAW = {
    "data": {"train": "unused.csv"},  # the frame is made in memory
    "features": [
        {"name": "user_id", "kind": "categorical"},
        {"name": "item_id", "kind": "categorical"},
        {"name": "price", "kind": "numeric", "transform": "log1p"},
    ],
    "funnel": {
        "model": "esmm",
        "embed_dim": 4,
        "tower": {"hidden": [16, 8]},
        "stages": [{"name": "click"}, {"name": "conversion", "after": "click"}],
    },
}


def bf16_autocast():
    """What Lightning's bf16-mixed precision plugin wraps every step in on a CPU."""
    return torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def model_and_batch():
    frame = generate(SyntheticSpec(rows=300, n_users=30, n_items=20, rates=(0.3, 0.4), seed=0))
    cfg = config_from_dict(RAW)
    graph = build_graph(cfg)
    fz = Featurizer(cfg, graph).fit(frame)
    torch.manual_seed(0)
    model = create_model(graph, cfg.funnel, fz.layout())
    return model, take(fz.encode(frame, "train").tensors(), slice(0, 128))


def softplus(x: float) -> float:
    return float(np.logaddexp(0.0, x))


def log_1mexp(log_p: float) -> float:
    """log(1 - p) as funnel.models.losses takes it: log p capped at -1e-30, so -log(1 - p) is at
    most 69.08 (a logit of 80 costs 69.08, not 80: finite, with no gradient past the cap)."""
    return float(np.log(-np.expm1(min(log_p, -1e-30))))


@pytest.mark.parametrize("b_click,b_conv", [(80.0, -80.0), (-80.0, 80.0), (30.0, 30.0), (-30.0, -30.0), (80.0, 80.0)])
def test_the_loss_is_finite_and_exact_at_extreme_logits_under_bf16(model_and_batch, b_click, b_conv):
    """Heads with zero weights and biases of +-30 / +-80 give every row the logits (b_click,
    b_conv); the ESMM losses are then, by hand (float64), with log(1 - p) as ``log_1mexp``:
    click: log p = -softplus(-b1), mean of -y log p - (1 - y) log(1 - p);
    conversion: log p = -(softplus(-b1) + softplus(-b2)), the same mean."""
    model, batch = model_and_batch
    heads = model.net.heads
    saved = {k: (h.weight.detach().clone(), h.bias.detach().clone()) for k, h in heads.items()}
    try:
        with torch.no_grad():
            for key, bias in (("m_click", b_click), ("m_conversion", b_conv)):
                heads[key].weight.zero_()
                heads[key].bias.fill_(bias)
        model.zero_grad()
        with bf16_autocast():
            out = model(batch)
            loss = model.loss(out, batch[LABELS])
        loss.total.backward()
    finally:
        with torch.no_grad():
            for key, (w, b) in saved.items():
                heads[key].weight.copy_(w)
                heads[key].bias.copy_(b)
    assert out.log_reach["conversion"].dtype == torch.float32 and loss.total.dtype == torch.float32
    y = batch[LABELS].double().numpy()
    want_click = np.mean(y[:, 0] * softplus(-b_click) - (1 - y[:, 0]) * log_1mexp(-softplus(-b_click)))
    log_p = -(softplus(-b_click) + softplus(-b_conv))
    want_conv = np.mean(-y[:, 1] * log_p - (1 - y[:, 1]) * log_1mexp(log_p))
    assert 0 < y[:, 0].mean() < 1 and 0 < y[:, 1].mean() < 1  # both classes: every term counts
    assert torch.isfinite(loss.total)
    np.testing.assert_allclose(float(loss.parts["click"].detach()), want_click, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(loss.parts["conversion"].detach()), want_conv, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name


def test_the_funnel_is_composed_in_float32_from_bf16_logits():
    """log P(conversion) = logsigmoid(a) + logsigmoid(b) = -8.57 here; in bfloat16 the sum would
    round to steps of 0.0625 (6% in p). Under autocast it is computed in float32."""
    from funnel.graph import FunnelGraph
    from funnel.models.net import FunnelNet

    graph = FunnelGraph.chain([("click", "click", None), ("conversion", "conversion", "click")])
    a, b = torch.tensor([-3.3]).bfloat16(), torch.tensor([-5.1]).bfloat16()
    net = FunnelNet.__new__(FunnelNet)  # only its compose is used: no layers needed
    net.graph, net.compose_fn = graph, compose
    with bf16_autocast():
        out = net.compose({"click": a, "conversion": b})
    want = float(F.logsigmoid(a.double()) + F.logsigmoid(b.double()))  # a, b as bfloat16 holds them
    got = out.log_reach["conversion"]
    assert got.dtype == torch.float32
    assert abs(float(got) - want) < 1e-6
    assert abs(float(got.bfloat16()) - want) > 1e-3  # what bfloat16 would have kept


def test_heads_give_float32_logits_under_bf16_autocast(model_and_batch):
    """The towers run in bfloat16; the heads (one dot product per row) in float32, so the logits
    are not rounded to bfloat16's 8-bit mantissa (ties in the validation AUCs)."""
    model, batch = model_and_batch
    with torch.no_grad():
        exact = model(batch).logits
        with bf16_autocast():
            fast = model(batch).logits
    for name, logit in fast.items():
        assert logit.dtype == torch.float32
        assert (logit.bfloat16().float() != logit).any(), name  # not bfloat16 values
        assert (logit - exact[name]).abs().max() < 0.05, name
