"""Shared bottoms (shared_bottom, MMoE, PLE) and the position-bias shallow tower."""

from __future__ import annotations

import copy
import uuid

import pytest
import torch
from torch import nn

from funnel.data.featurizer import Featurizer
from funnel.data.table import take
from funnel.errors import ConfigError
from funnel.models import create_model
from funnel.models.bottoms import BOTTOMS, MMoE, build_bottom, register_bottom
from funnel.models.inputs import InputShape, TowerInput
from funnel.runs import build_graph
from funnel.spec import config_from_dict
from funnel.spec.schema import TowerSpec
from funnel.synthetic import SyntheticSpec, generate

STAGES = ["click", "conversion"]


def toy() -> tuple[InputShape, TowerInput]:
    """6 rows of a flat input of width 5, with a categorical field ``user`` and a behaviour
    history ``hist`` (3 items, the padding first as the encoders give it; row 5 has none)."""
    torch.manual_seed(0)
    flat = torch.randn(6, 5)
    user, hist = torch.randn(6, 2), torch.randn(6, 3, 2)
    mask = torch.tensor([[True] * 3, [False, True, True], [False, False, True]] * 2)
    mask[5] = False
    shape = InputShape(flat_dim=5, field_dims={"user": 2, "hist": 2}, numeric_dim=5, sequence_fields=("hist",))
    return shape, TowerInput(flat, {"user": user, "hist": hist.mean(1)}, flat, {"hist": (hist, mask)})


# Every registered bottom is tested: the parameter lists come from the registry.
BOTTOM_NAMES = BOTTOMS.names()

# Small arguments with an output width of 8 for the built-ins; other bottoms take their defaults.
PARAMS = {
    "shared_bottom": {"hidden": [8]},
    "mmoe": {"experts": 3, "expert_hidden": [8]},
    "ple": {"layers": 2, "shared_experts": 2, "specific_experts": 1, "expert_hidden": [8]},
    "dupn": {"lstm_hidden": 3, "attention": 4},  # [flat (5), u (3)]
}


def check_bottom(kind: str) -> None:
    """The check every registered bottom gets: one finite (B, out_dim) vector per stage, finite
    gradients, and gate weights (if it logs any) that are a distribution per stage."""
    shape, x = toy()
    x = TowerInput(x.flat.clone().requires_grad_(True), x.fields, x.numeric, x.sequences)
    bottom = build_bottom(TowerSpec(type=kind, params=tuple(PARAMS.get(kind, {}).items())), shape, STAGES)
    out = bottom(x)
    assert set(out) == set(STAGES), kind
    assert all(v.shape == (6, bottom.out_dim) and torch.isfinite(v).all() for v in out.values()), kind
    if kind in PARAMS:
        assert bottom.out_dim == 8
    sum(v.sum() for v in out.values()).backward()
    assert x.flat.grad is not None and torch.isfinite(x.flat.grad).all(), kind
    if kind in ("mmoe", "ple"):
        assert set(bottom.gates) == set(STAGES)
    for w in getattr(bottom, "gates", {}).values():  # gated: the logged gate weights
        assert torch.isclose(w.sum(), torch.tensor(1.0)), kind


def test_every_registered_bottom_is_parametrised():
    assert BOTTOMS.names() == BOTTOM_NAMES
    assert set(PARAMS) <= set(BOTTOMS.names())
    assert {"shared_bottom", "mmoe", "ple", "dupn"} <= set(BOTTOM_NAMES)


@pytest.mark.parametrize("kind", BOTTOM_NAMES)
def test_every_bottom_gives_one_vector_per_stage(kind):
    check_bottom(kind)


def _throwaway_bottom(fill: float):
    class Throwaway(nn.Module):
        def __init__(self, shape: InputShape, stages, width: int = 3):
            super().__init__()
            self.stages = list(stages)
            self.layer = nn.Linear(shape.flat_dim, width)
            self.fill = fill
            self.out_dim = width

        def forward(self, x: TowerInput) -> dict[str, torch.Tensor]:
            h = torch.tanh(self.layer(x.flat)) + self.fill
            return {s: h for s in self.stages}

    return Throwaway


def test_mmoe_output_is_the_gate_weighted_sum_of_experts():
    shape, x = toy()
    m = MMoE(shape, STAGES, experts=2, expert_hidden=[4])
    e = torch.stack([net(x.flat) for net in m.experts.nets], 1)
    w = torch.softmax(m.gate["m_click"](x.flat), -1)
    torch.testing.assert_close(m(x)["click"], w[:, :1] * e[:, 0] + w[:, 1:] * e[:, 1])


def test_shared_bottom_is_one_network_for_all_stages():
    shape, x = toy()
    out = build_bottom(TowerSpec(type="shared_bottom"), shape, STAGES)(x)
    assert out["click"] is out["conversion"]


FEATURES = [
    {"name": "user_id", "kind": "categorical"},
    {"name": "item_id", "kind": "categorical"},
    {"name": "position", "kind": "categorical"},
    {"name": "price", "kind": "numeric"},
    {"name": "history", "kind": "sequence", "share_with": "item_id", "max_len": 4},
]


def raw(**funnel) -> dict:
    return {
        "data": {"train": "unused.csv"},
        "features": copy.deepcopy(FEATURES),
        "funnel": {"embed_dim": 4, "stages": [{"name": "click"}, {"name": "conversion", "after": "click"}]} | funnel,
    }


@pytest.fixture(scope="module")
def frame():
    return generate(SyntheticSpec(rows=400, n_users=40, n_items=30, positions=5, rates=(0.3, 0.4), history_len=4))


def build(frame, **funnel):
    cfg = config_from_dict(raw(**funnel))
    graph = build_graph(cfg)
    fz = Featurizer(cfg, graph).fit(frame)
    torch.manual_seed(0)
    return create_model(graph, cfg.funnel, fz.layout()), take(fz.encode(frame, "train").tensors(), slice(0, 50))


@pytest.mark.parametrize("kind", BOTTOM_NAMES)
@pytest.mark.parametrize("model", ["esmm", "aitm"])
def test_bottoms_train_inside_funnel_models(frame, kind, model):
    check_bottom_in_model(frame, kind, model)


def check_bottom_in_model(frame, kind: str, model: str) -> None:
    m, batch = build(frame, model=model, bottom={"type": kind})
    loss = m.loss(m(batch), batch["labels"])
    loss.total.backward()
    assert torch.isfinite(loss.total), kind
    assert m.net.embeddings.table_grad("user_id").abs().sum() > 0, kind


def test_a_newly_registered_bottom_gets_the_same_checks_and_a_broken_one_fails_them(frame):
    kind = f"tmp_bottom_{uuid.uuid4().hex[:8]}"
    assert kind not in BOTTOM_NAMES
    try:
        register_bottom(kind)(_throwaway_bottom(0.0))
        assert kind in BOTTOMS.names()  # what BOTTOM_NAMES holds when the registering module is imported first
        check_bottom(kind)
        for model in ("esmm", "aitm"):
            check_bottom_in_model(frame, kind, model)
        BOTTOMS._items[kind] = _throwaway_bottom(float("nan"))  # a bottom that puts out NaN is caught
        with pytest.raises(AssertionError, match=kind):
            check_bottom(kind)
    finally:
        del BOTTOMS._items[kind]
    assert BOTTOMS.names() == BOTTOM_NAMES


def test_bottom_problems_are_reported_at_validation():
    with pytest.raises(
        ConfigError, match="funnel.bottom.expert: bottom 'mmoe' has no argument 'expert'. Did you mean \"experts\""
    ):
        config_from_dict(raw(bottom={"type": "mmoe", "expert": 3}))
    with pytest.raises(ConfigError, match="unknown bottom 'mmeo'.*Did you mean \"mmoe\""):
        config_from_dict(raw(bottom={"type": "mmeo"}))
    assert config_from_dict(raw(bottom="none")).funnel.bottom.type == "none"


def test_bottom_with_private_embeddings_is_refused(frame):
    with pytest.raises(ConfigError, match="a shared bottom needs shared embeddings"):
        build(frame, model="base", bottom={"type": "mmoe"})


# ---- position-bias shallow tower -----------------------------------------------------------------


def test_bias_logit_is_added_in_training_and_dropped_in_eval(frame):
    m, batch = build(frame, bias_tower={"features": ["position"], "feature_dropout": 0.0})
    assert "position" not in m.net.embeddings.table_names  # bias features feed the shallow tower only
    assert m.net.embeddings.shape.field_dims.keys() == {"user_id", "item_id", "history"}
    m.train()
    with_bias, _ = m.net.edge_logits(batch)
    bias = m.net.bias(batch)
    m.eval()
    without, _ = m.net.edge_logits(batch)
    torch.testing.assert_close(with_bias["click"], without["click"] + bias)
    torch.testing.assert_close(with_bias["conversion"], without["conversion"])  # other stages untouched


def test_bias_feature_dropout_replaces_ids_with_the_unknown_id_in_training_only(frame):
    m, batch = build(frame, bias_tower={"features": ["position"], "feature_dropout": 0.5})
    unknown = {"cat": torch.zeros_like(batch["cat"])}  # every id 0
    m.train()
    torch.manual_seed(0)
    dropped = m.net.bias(batch)
    m.eval()
    kept, zero = m.net.bias(batch), m.net.bias(unknown)
    as_unknown = torch.isclose(dropped, zero) & ~torch.isclose(kept, zero)
    as_kept = torch.isclose(dropped, kept)
    assert (as_unknown | as_kept).all()
    assert 0.3 < as_unknown.float().mean() < 0.7  # about half of the rows lost their position
    assert torch.equal(m.net.bias(batch), kept)  # no dropout in eval


def test_bias_tower_can_be_kept_at_inference(frame):
    m, batch = build(frame, bias_tower={"features": ["position"], "keep_at_inference": True})
    m.eval()
    kept, _ = m.net.edge_logits(batch)
    m.net.bias.keep_at_inference = False
    dropped, _ = m.net.edge_logits(batch)
    assert not torch.allclose(kept["click"], dropped["click"])


@pytest.mark.parametrize(
    ("bias", "message"),
    [
        ({"features": ["postion"]}, "'postion' is not a feature. Did you mean \"position\""),
        ({"features": ["price"]}, "'price' is numeric; the bias tower takes categorical features"),
        ({"features": ["position"], "stage": "clik"}, "'clik' is not a stage. Did you mean \"click\""),
        ({"features": []}, "features must list at least one bias-only feature"),
    ],
)
def test_bias_tower_problems_are_reported(bias, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw(bias_tower=bias))


def test_position_free_auc_is_logged_for_the_first_stage(frame):
    from funnel.inference import evaluate_table

    cfg = config_from_dict(raw(bias_tower={"features": ["position"]}))
    graph = build_graph(cfg)
    fz = Featurizer(cfg, graph).fit(frame)
    model = create_model(graph, cfg.funnel, fz.layout())
    table = fz.encode(frame, "test")
    assert torch.equal(table.truth["free"][:, 0], torch.tensor(frame["cf_click_free"].to_numpy(), dtype=torch.float32))
    values = evaluate_table(model, table, 128)
    assert 0 <= values["auc_free/click"] <= 1 and "auc_free/conversion" not in values


@pytest.mark.parametrize("kind", BOTTOM_NAMES)
def test_bottoms_score_in_bf16_close_to_float32(frame, kind):
    from funnel.data.table import EncodedTable
    from funnel.inference import dense_layers_to_bf16, predict_table

    m, batch = build(frame, model="aitm", bottom={"type": kind})
    table = EncodedTable(cat=batch["cat"], num=batch["num"], seq={"history": batch["seq/history"]})
    exact = predict_table(m, table, 16)
    fast = predict_table(dense_layers_to_bf16(copy.deepcopy(m)), table, 16, bf16=True)
    assert fast.notna().all().all() and (fast - exact).abs().max().max() < 0.02


# ---- the DUPN bottom: one user vector for every stage ---------------------------------------------


def test_dupn_bottom_hands_every_stage_flat_and_one_user_vector():
    shape, x = toy()
    bottom = build_bottom(TowerSpec(type="dupn", params=(("lstm_hidden", 3), ("attention", 4))), shape, STAGES)
    out = bottom(x)
    assert out["click"] is out["conversion"]  # computed once, shared
    torch.testing.assert_close(out["click"][:, :5], x.flat)  # [flat, u]
    keys, mask = x.sequences["hist"]
    u = bottom.user(keys, mask, x.fields["user"])  # the query defaults to every non-sequence field
    torch.testing.assert_close(out["click"][:, 5:], u)
    assert out["click"][5, 5:].abs().sum().item() == 0.0  # row 5 has no history: u = 0
    assert bottom.query_fields == ["user"] and bottom.sequence == "hist"


def test_dupn_bottom_refuses_inputs_it_cannot_use(frame):
    with pytest.raises(ConfigError, match="funnel.bottom: 'dupn' rejected its arguments: dupn needs `sequence`"):
        build_bottom(TowerSpec(type="dupn"), InputShape(flat_dim=4, field_dims={"a": 4}, numeric_dim=0), STAGES)
    with pytest.raises(ConfigError, match="query field 'usr_id' is not a categorical or multi-hot feature"):
        build(frame, bottom={"type": "dupn", "query": ["usr_id"]})
    with pytest.raises(ConfigError, match="funnel.bottom.hidden: bottom 'dupn' has no argument 'hidden'"):
        config_from_dict(raw(bottom={"type": "dupn", "hidden": [8]}))
