"""ESM² branching: a stage reached through both outcomes of a sibling branch stage."""

from __future__ import annotations

import math

import pytest
import torch

from funnel.errors import ConfigError
from funnel.graph import FunnelGraph
from funnel.models.net import compose
from funnel.models.weighting import StaticWeighting
from funnel.models.zoo import EntireSpaceLoss
from funnel.spec import config_from_dict

# click -> {cart | no cart} -> buy
ESM2 = FunnelGraph.build(
    [
        ("click", "click", None, None),
        ("buy", "buy", "click", "cart"),  # listed before its branch: order is derived
        ("cart", "cart", "click", None),
    ]
)
L1, L2, L3, L4 = [1.0, -2.0, 0.3], [0.5, 2.5, -1.0], [2.0, -0.5, 0.0], [-1.0, 1.0, -3.0]  # 3 rows


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def logits(dtype=torch.float64) -> dict[str, torch.Tensor]:
    return {
        "click": torch.tensor(L1, dtype=dtype),
        "cart": torch.tensor(L2, dtype=dtype),
        "buy@cart": torch.tensor(L3, dtype=dtype),
        "buy@not_cart": torch.tensor(L4, dtype=dtype),
    }


def test_branch_stage_gets_one_tower_per_outcome_and_comes_after_its_branch():
    assert ESM2.names == ["click", "cart", "buy"]
    assert ESM2.towers == ["click", "cart", "buy@cart", "buy@not_cart"]
    assert ESM2.stage("buy").after == "click"


def test_esm2_path_probabilities_match_the_paper_formula_on_three_rows():
    out = compose(ESM2, logits())
    reach, cond = out.stacked(ESM2.names)
    for i in range(3):
        y1, y2, y3, y4 = sig(L1[i]), sig(L2[i]), sig(L3[i]), sig(L4[i])
        assert reach[i, 0].item() == pytest.approx(y1, rel=1e-12)
        assert reach[i, 1].item() == pytest.approx(y1 * y2, rel=1e-12)  # pCTAVR
        assert reach[i, 2].item() == pytest.approx(y1 * ((1 - y2) * y4 + y2 * y3), rel=1e-12)  # pCTCVR
        assert cond[i, 2].item() == pytest.approx((1 - y2) * y4 + y2 * y3, rel=1e-12)  # pCVR given click


def test_branch_weights_sum_to_one():
    out = compose(ESM2, logits())
    p_cart = out.log_cond["cart"].exp()
    p_not_cart = (torch.log1p(-p_cart)).exp()
    assert torch.allclose(p_cart + p_not_cart, torch.ones(3, dtype=torch.float64))
    # with both branch towers equal, the mixture is that tower: the weights sum to one
    same = logits()
    same["buy@not_cart"] = same["buy@cart"]
    cond = compose(ESM2, same).log_cond["buy"].exp()
    assert torch.allclose(cond, torch.sigmoid(same["buy@cart"]))


def test_esm2_loss_is_the_weighted_sum_of_the_three_path_bces():
    click, cart, buy = [1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]
    labels = torch.tensor([click, cart, buy], dtype=torch.float64).T
    loss = EntireSpaceLoss(ESM2)(compose(ESM2, logits()), labels)

    def bce(p, y):
        return -(y * math.log(p) + (1 - y) * math.log(1 - p))

    want = 0.0
    for i in range(3):
        y1, y2, y3, y4 = sig(L1[i]), sig(L2[i]), sig(L3[i]), sig(L4[i])
        want += (
            1.0 * bce(y1, click[i]) + 2.0 * bce(y1 * y2, cart[i]) + 3.0 * bce(y1 * ((1 - y2) * y4 + y2 * y3), buy[i])
        ) / 3
    total = StaticWeighting(ESM2.names, [1.0, 2.0, 3.0])(loss.parts)
    assert total.item() == pytest.approx(want, rel=1e-10)


def _raw(model="esmm", **buy):
    return {
        "data": {"train": "t.csv"},
        "features": [{"name": "user_id", "kind": "categorical"}],
        "funnel": {
            "model": model,
            "stages": [
                {"name": "click"},
                {"name": "cart", "after": "click"},
                {"name": "buy", "after": "click", "via": "cart", **buy},
            ],
        },
    }


def test_via_must_name_a_sibling_stage():
    with pytest.raises(ConfigError) as err:
        config_from_dict(_raw(via="crat"))
    assert "funnel.stages[2].via: 'crat' is not a stage or group." in str(err.value) and 'Did you mean "cart"?' in str(
        err.value
    )
    with pytest.raises(ConfigError) as err:
        config_from_dict(_raw(after="cart"))
    assert "a branch splits the rows of `after`" in str(err.value)


def test_chain_only_models_refuse_branches_at_validation():
    with pytest.raises(ConfigError) as err:
        config_from_dict(_raw(model="base"))
    assert "'base' supports chains only, but stage 'buy' has `via`" in str(err.value)
    assert config_from_dict(_raw(model="esmm_ns")).funnel.stages[2].via == "cart"


def test_esm2_config_trains_and_predicts_every_stage_and_branch(tmp_path):
    from pathlib import Path

    import pandas as pd

    from funnel.inference import predict_run
    from funnel.synthetic import SyntheticSpec, write
    from funnel.training.fit import fit

    run = fit(
        Path(__file__).resolve().parents[1] / "configs/esm2.yaml",
        [
            "data.synthetic.rows=3000",
            "trainer.max_epochs=1",
            "trainer.enable_progress_bar=false",
            "trainer.log_every_n_steps=1",
            f"run_dir={tmp_path / 'run'}",
        ],
    )
    paths = write(tmp_path / "data", SyntheticSpec(rows=500, stages=("click", "cart", "buy"), branch=True))
    out = predict_run(run, paths["test"], tmp_path / "p.csv", keep=["item_id"])
    pred, src = pd.read_csv(out), pd.read_csv(paths["test"])
    assert list(pred.columns) == [
        "item_id",
        "p_click",
        "p_click_cond",
        "p_cart",
        "p_cart_cond",
        "p_buy",
        "p_buy_cond",
        "p_buy_via_cart_cond",
        "p_buy_via_not_cart_cond",
    ]
    assert (pred["item_id"] == src["item_id"]).all()
    y2, y3, y4 = pred["p_cart_cond"], pred["p_buy_via_cart_cond"], pred["p_buy_via_not_cart_cond"]
    assert ((pred["p_buy_cond"] - (y2 * y3 + (1 - y2) * y4)).abs() < 1e-5).all()
    assert ((pred["p_buy"] - pred["p_click"] * pred["p_buy_cond"]).abs() < 1e-6).all()


# k-way branch: click -> {cart | wish | neither} -> buy, cart and wish in group "action"
KWAY = FunnelGraph.build(
    [
        ("click", "click", None, None),
        ("cart", "cart", "click", None),
        ("wish", "wish", "click", None),
        ("buy", "buy", "click", "action"),
    ],
    groups={"cart": "action", "wish": "action"},
)
LW, LB_WISH = [-1.0, 0.0, 2.0], [0.5, -2.0, 1.5]


def kway_logits() -> dict[str, torch.Tensor]:
    t = {k: v for k, v in logits().items() if k != "buy@not_cart"}
    t |= {
        "wish": torch.tensor(LW, dtype=torch.float64),
        "buy@wish": torch.tensor(LB_WISH, dtype=torch.float64),
        "buy@not_action": torch.tensor(L4, dtype=torch.float64),
    }
    return t


def test_kway_branch_has_a_tower_per_member_and_one_for_none():
    assert KWAY.groups == {"action": ["cart", "wish"]}
    assert KWAY.towers == ["click", "cart", "wish", "buy@cart", "buy@wish", "buy@not_action"]


def test_kway_group_is_a_softmax_and_the_mixture_matches_hand_values():
    out = compose(KWAY, kway_logits())
    reach, cond = out.stacked(KWAY.names)
    for i in range(3):
        z = 1 + math.exp(L2[i]) + math.exp(LW[i])  # softmax over [none=0, cart, wish]
        p_cart, p_wish, p_none = math.exp(L2[i]) / z, math.exp(LW[i]) / z, 1 / z
        y1 = sig(L1[i])
        assert cond[i, 1].item() == pytest.approx(p_cart, rel=1e-12)
        assert cond[i, 2].item() == pytest.approx(p_wish, rel=1e-12)
        assert p_cart + p_wish + p_none == pytest.approx(1.0)  # the branch weights sum to one
        mix = p_cart * sig(L3[i]) + p_wish * sig(LB_WISH[i]) + p_none * sig(L4[i])
        assert cond[i, 3].item() == pytest.approx(mix, rel=1e-12)
        assert reach[i, 3].item() == pytest.approx(y1 * mix, rel=1e-12)
        assert reach[i, 2].item() == pytest.approx(y1 * p_wish, rel=1e-12)


def test_a_group_of_one_stage_is_the_plain_sigmoid():
    single = FunnelGraph.build(
        [
            ("click", "click", None, None),
            ("cart", "cart", "click", None),
            ("buy", "buy", "click", "cart"),
        ],
        groups={"cart": "g"},
    )
    a, b = compose(single, logits()), compose(ESM2, logits())
    assert torch.allclose(a.log_cond["cart"], b.log_cond["cart"])
    with_none = {**logits(), "buy@not_g": logits()["buy@not_cart"]}
    single_via = FunnelGraph.build(
        [("click", "click", None, None), ("cart", "cart", "click", None), ("buy", "buy", "click", "g")],
        groups={"cart": "g"},
    )
    assert torch.allclose(compose(single_via, with_none).log_reach["buy"], b.log_reach["buy"])


def _kway_raw(model="esmm", **changes):
    stages = [
        {"name": "click"},
        {"name": "cart", "after": "click", "group": "action"},
        {"name": "wish", "after": "click", "group": "action"},
        {"name": "buy", "after": "click", "via": "action"},
    ]
    for i, change in changes.items():
        stages[int(i[1:])] |= change
    return {
        "data": {"train": "t.csv"},
        "features": [{"name": "user_id", "kind": "categorical"}],
        "funnel": {"model": model, "stages": stages},
    }


def test_group_problems_are_reported_with_their_fix():
    with pytest.raises(ConfigError) as err:
        config_from_dict(_kway_raw(s2={"after": "cart"}))
    assert "group 'action' follows 'click'" in str(err.value) and "give them the same `after`" in str(err.value)
    with pytest.raises(ConfigError) as err:
        config_from_dict(_kway_raw(s1={"group": "click"}, s2={"group": "click"}, s3={"via": "click"}))
    assert "'click' is also a stage name" in str(err.value)
    with pytest.raises(ConfigError) as err:
        config_from_dict(_kway_raw(model="division", s3={"via": None}))
    assert "stage 'cart' is in a group of exclusive outcomes" in str(err.value)
    cfg = config_from_dict(_kway_raw())
    assert [s.group for s in cfg.funnel.stages] == [None, "action", "action", None]


def test_kway_model_trains_through_the_softmax(tmp_path):
    import numpy as np
    import pandas as pd

    from funnel.training.fit import fit

    rng = np.random.default_rng(0)
    n = 600
    click = rng.random(n) < 0.5
    action = np.where(click, rng.choice(3, n, p=[0.5, 0.3, 0.2]), 0)  # 0 none, 1 cart, 2 wish
    buy = click & (rng.random(n) < np.choose(action, [0.05, 0.6, 0.3]))
    df = pd.DataFrame(
        {
            "user_id": rng.integers(20, size=n).astype(str),
            "click": click.astype(int),
            "cart": (action == 1).astype(int),
            "wish": (action == 2).astype(int),
            "buy": buy.astype(int),
        }
    )
    df.to_csv(tmp_path / "t.csv", index=False)
    raw = _kway_raw()
    raw["data"] = {"train": str(tmp_path / "t.csv"), "valid_split": 0.2}
    import yaml

    (tmp_path / "c.yaml").write_text(
        yaml.safe_dump(
            raw
            | {
                "trainer": {"max_epochs": 1, "enable_progress_bar": False, "log_every_n_steps": 1},
                "run_dir": str(tmp_path / "run"),
            }
        )
    )
    run = fit(tmp_path / "c.yaml")
    from funnel.inference import predict_run

    pred = pd.read_csv(predict_run(run, tmp_path / "t.csv", tmp_path / "p.csv"))
    assert {"p_buy_via_cart_cond", "p_buy_via_wish_cond", "p_buy_via_not_action_cond"} <= set(pred.columns)
    total = pred["p_cart_cond"] + pred["p_wish_cond"]
    assert (total < 1).all()  # mutually exclusive: one softmax
    mix = (
        pred["p_cart_cond"] * pred["p_buy_via_cart_cond"]
        + pred["p_wish_cond"] * pred["p_buy_via_wish_cond"]
        + (1 - total) * pred["p_buy_via_not_action_cond"]
    )
    assert ((pred["p_buy_cond"] - mix).abs() < 1e-5).all()
