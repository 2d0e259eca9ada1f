"""Tests for funnel.models: composing funnel probabilities, the registries, and the built network."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from funnel.data.featurizer import Featurizer
from funnel.data.table import take
from funnel.errors import ConfigError
from funnel.graph import FunnelGraph
from funnel.inference import predict_table
from funnel.models import MODELS, create_model
from funnel.models.embedding import SharedEmbeddings
from funnel.models.inputs import InputShape
from funnel.models.net import compose
from funnel.models.towers import build_tower
from funnel.runs import build_graph
from funnel.spec import config_from_dict
from funnel.spec.schema import TowerSpec
from funnel.synthetic import SyntheticSpec, generate

THREE = FunnelGraph.chain([("click", "click", None), ("cart", "cart", "click"), ("buy", "buy", "cart")])


def test_compose_chains_log_probabilities():
    logits = {"click": torch.tensor([0.5, -2.0]), "cart": torch.tensor([1.0, 3.0]), "buy": torch.tensor([-1.5, 0.0])}
    out = compose(THREE, logits)
    ls = {k: F.logsigmoid(v) for k, v in logits.items()}
    assert set(out.log_reach) == set(out.log_cond) == {"click", "cart", "buy"}
    for name in ("click", "cart", "buy"):
        torch.testing.assert_close(out.log_cond[name], ls[name])
    torch.testing.assert_close(out.log_reach["click"], ls["click"])
    torch.testing.assert_close(out.log_reach["cart"], ls["click"] + ls["cart"])
    torch.testing.assert_close(out.log_reach["buy"], ls["click"] + ls["cart"] + ls["buy"])


def test_stacked_gives_probabilities_in_the_requested_order():
    logits = {"click": torch.tensor([0.0]), "cart": torch.tensor([0.0]), "buy": torch.tensor([0.0])}
    reach, cond = compose(THREE, logits).stacked(["buy", "click"])
    torch.testing.assert_close(reach, torch.tensor([[0.125, 0.5]]))
    torch.testing.assert_close(cond, torch.tensor([[0.5, 0.5]]))


# ---- a model built from a config and a fitted featurizer -----------------------------------------------

FEATURES = [
    {"name": "user_id", "kind": "categorical"},
    {"name": "item_id", "kind": "categorical"},
    {"name": "device", "kind": "categorical"},
    {"name": "price", "kind": "numeric", "transform": "log1p"},
    {"name": "n_prev_visits", "kind": "numeric"},
]
RAW = {
    "data": {"train": "unused.csv"},  # the frame below is made in memory
    "features": FEATURES,
    "funnel": {
        "embed_dim": 4,
        "tower": {"hidden": [8]},
        "stages": [{"name": "buy", "after": "cart"}, {"name": "click"}, {"name": "cart", "after": "click"}],
    },
}


@pytest.fixture(scope="module")
def frame():
    return generate(
        SyntheticSpec(rows=400, n_users=50, n_items=40, stages=("click", "cart", "buy"), rates=(0.3, 0.4, 0.5))
    )


def build(frame, model: str = "esmm", **funnel):
    raw = copy.deepcopy(RAW)
    raw["funnel"].update(model=model, **funnel)
    cfg = config_from_dict(raw)
    graph = build_graph(cfg)
    fz = Featurizer(cfg, graph).fit(frame)
    table = fz.encode(frame, "train")
    torch.manual_seed(0)
    return create_model(graph, cfg.funnel, fz.layout()), table


@pytest.mark.parametrize("name", MODELS.names())
def test_every_registered_model_outputs_finite_probabilities_per_stage(frame, name):
    model, table = build(frame, name)
    batch = take(table.tensors(), slice(0, 32))
    out = model(batch)
    assert model.graph.names == ["click", "cart", "buy"]  # listed child first, ordered parent first
    for stage in ("click", "cart", "buy"):
        assert out.log_reach[stage].shape == (32,) and out.log_cond[stage].shape == (32,)
        assert torch.isfinite(out.log_reach[stage]).all() and (out.log_reach[stage] <= 0).all()
    loss = model.loss(out, batch["labels"])
    assert set(loss.parts) == {"click", "cart", "buy"} and torch.isfinite(loss.total)
    loss.total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_tower_rejecting_its_arguments_is_a_config_error():
    shape = InputShape(flat_dim=6, field_dims={}, numeric_dim=6)
    with pytest.raises(ConfigError, match="activation 'rellu' is not one of.*Did you mean \"relu\""):
        build_tower(TowerSpec(type="mlp", params=(("activation", "rellu"),)), shape, "funnel.tower")


def test_mlp_tower_widths_follow_hidden():
    shape = InputShape(flat_dim=6, field_dims={}, numeric_dim=6)
    tower = build_tower(TowerSpec(type="mlp", params=(("hidden", (16, 3)),)), shape, "funnel.tower")
    linears = [m for m in tower.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(6, 16), (16, 3)]
    assert tower.out_dim == 3


def test_model_probabilities_multiply_along_the_path(frame):
    model, table = build(frame)
    pred = predict_table(model, table, batch_size=100)
    assert list(pred.columns) == ["p_click", "p_click_cond", "p_cart", "p_cart_cond", "p_buy", "p_buy_cond"]
    assert len(pred) == len(table)
    np.testing.assert_allclose(pred["p_click"], pred["p_click_cond"], rtol=1e-6)
    np.testing.assert_allclose(pred["p_cart"], pred["p_click"] * pred["p_cart_cond"], rtol=1e-5)
    np.testing.assert_allclose(pred["p_buy"], pred["p_cart"] * pred["p_buy_cond"], rtol=1e-5)


def test_esmm_shares_embeddings_and_every_tower_reaches_them(frame):
    model, table = build(frame, "esmm")
    batch = take(table.tensors(), slice(0, 64))
    emb = model.net.embeddings
    assert emb.table_names == ("user_id", "item_id", "device")  # one table each, used by every tower
    for stage in ("click", "buy"):  # the first tower and a conditional one
        model.zero_grad()
        model(batch).logits[stage].sum().backward()
        for name in emb.table_names:
            grad = emb.table_grad(name)
            assert grad is not None and grad.abs().sum() > 0, (stage, name)


def test_esmm_loss_trains_every_tower_and_the_shared_tables(frame):
    model, table = build(frame, "esmm")
    batch = take(table.tensors(), slice(0, 64))
    model.loss(model(batch), batch["labels"]).total.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_model_outputs_are_keyed_by_stage_name_not_position(frame):
    model, table = build(frame)
    out = model(take(table.tensors(), slice(0, 4)))
    assert list(out.log_reach) == ["click", "cart", "buy"]
    assert set(out.logits) == {"click", "cart", "buy"}


def test_sequence_feature_shares_the_item_table_and_pools_only_real_items():
    import pandas as pd

    from funnel.data.featurizer import Featurizer
    from funnel.runs import build_graph
    from funnel.spec import config_from_dict

    cfg = config_from_dict(
        {
            "data": {"train": "unused.csv"},
            "features": [
                {"name": "item_id", "kind": "categorical"},
                {"name": "history", "kind": "sequence", "share_with": "item_id", "max_len": 3},
            ],
            "funnel": {
                "embed_dim": 4,
                "tower": {"type": "mlp", "hidden": [8]},
                "stages": [{"name": "click"}, {"name": "buy", "after": "click"}],
            },
        }
    )
    df = pd.DataFrame(
        {"item_id": ["a", "b", "c"], "history": ["a|b", "", "c|c|a|b"], "click": [1, 0, 1], "buy": [1, 0, 0]}
    )
    graph = build_graph(cfg)
    feat = Featurizer(cfg, graph).fit(df)
    table = feat.encode(df, "train")
    model = create_model(graph, cfg.funnel, feat.layout())
    emb = model.net.embeddings
    assert emb.table_names == ("item_id",)  # history reuses item_id's table
    ids = table.seq["history"]
    assert ids[1].tolist() == [0, 0, 0]  # empty history: all padding

    x = model.net.embeddings(table.tensors())
    assert x.flat.shape == (3, 8)  # item (4) + pooled history (4)
    assert torch.equal(x.fields["history"][1], torch.zeros(4))  # nothing to pool
    weight = emb.table_weight("item_id")
    row0 = weight[ids[0][ids[0] > 0]].mean(0)
    assert torch.allclose(x.fields["history"][0], row0)  # mean over the real items only

    out = model(table.tensors())
    model.loss(out, table.labels).total.backward()
    touched = emb.table_grad("item_id").abs().sum(1) > 0
    assert touched[ids[2][ids[2] > 0]].all()  # the history's items receive gradient


def short_fit(run_dir, *overrides: str):
    """2 epochs of configs/esmm.yaml on 20k generated rows; returns (run dir, test metrics)."""
    import json
    from pathlib import Path

    from funnel.training.fit import fit

    root = Path(__file__).resolve().parents[1]
    run = fit(
        root / "configs/esmm.yaml",
        [
            "data.synthetic.rows=20000",
            "trainer.max_epochs=2",
            "trainer.enable_progress_bar=false",
            "trainer.early_stopping=null",
            "trainer.log_every_n_steps=5",
            *overrides,
            f"run_dir={run_dir}",
        ],
    )
    return run, json.loads((run / "metrics.json").read_text())


@pytest.fixture(scope="module")
def float32_run(tmp_path_factory):
    """The dense-Adam float32 baseline both speed options are compared with (fitted once)."""
    return short_fit(tmp_path_factory.mktemp("f32") / "run")[1]


def test_sparse_embeddings_train_with_lazy_adam_and_match_dense_adam(tmp_path, float32_run):
    """optim.sparse_embeddings: LazyAdam on the tables, Adam on the rest; one global step
    per batch; the metrics of a short run stay within noise of dense Adam."""
    sparse, b = short_fit(tmp_path / "sparse", "optim.sparse_embeddings=true")
    for key in ("auc/click", "auc/conversion"):
        assert abs(float32_run[key] - b[key]) < 0.03, (key, float32_run[key], b[key])
    ckpt = torch.load(sparse / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2 * -(-16000 // 1024)  # one step per batch, not one per optimiser
    with pytest.raises(ConfigError, match="sparse_embeddings cannot apply weight_decay"):
        config_from_dict(RAW | {"optim": {"sparse_embeddings": True, "weight_decay": 0.01}})


def test_bf16_mixed_training_stays_within_noise_of_float32(tmp_path, float32_run):
    _, b = short_fit(tmp_path / "bf16", "trainer.precision=bf16-mixed")
    for key in ("auc/click", "auc/conversion", "calib/click"):
        assert abs(float32_run[key] - b[key]) < 0.03, (key, float32_run[key], b[key])


@pytest.mark.parametrize("name", ["esmm", "esmm_ns"])
def test_a_model_saved_with_one_table_per_feature_loads_into_the_fused_tables(frame, name):
    """Runs trained before the fused tables (keys ``...tables.m_<feature>.weight``) still load."""
    model, table = build(frame, name)
    batch = take(table.tensors(), slice(0, 32))
    model.eval()
    expected = model(batch).log_reach["buy"]
    old_state = {k: v for k, v in model.state_dict().items() if ".fused." not in k}
    for path, emb in model.named_modules():
        if isinstance(emb, SharedEmbeddings):  # ESMM-NS has one per tower
            for t in emb.table_names:
                old_state[f"{path}.tables.m_{t}.weight"] = emb.table_weight(t).detach().clone()
    fresh, _ = build(frame, name)
    torch.manual_seed(1)
    for p in fresh.parameters():
        torch.nn.init.normal_(p)
    fresh.load_state_dict(old_state)
    fresh.eval()
    torch.testing.assert_close(fresh(batch).log_reach["buy"], expected)
