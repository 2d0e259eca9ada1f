"""The tower registry and every built-in tower: hand-computed parts, masking, plug-ins, and
every tower inside every funnel model (esmm, ESM², aitm) on data with a behaviour history."""

from __future__ import annotations

import copy
import sys
import textwrap
import uuid

import pytest
import torch
from torch import nn

from funnel.data.featurizer import Featurizer
from funnel.data.table import take
from funnel.errors import ConfigError
from funnel.models import TOWERS, create_model, register_tower
from funnel.models.inputs import InputShape, TowerInput
from funnel.models.towers import build_tower
from funnel.models.towers.dcn import CrossLayer
from funnel.models.towers.deepfm import fm_interaction
from funnel.models.towers.dupn import LSTM, valid_first
from funnel.models.towers.nfwfm import fwfm_interaction
from funnel.runs import build_graph
from funnel.spec import config_from_dict
from funnel.spec.schema import TowerSpec
from funnel.synthetic import SyntheticSpec, generate

# Every registered tower is tested: the parameter lists below come from the registry, so a
# new tower (built-in or registered by a plug-in imported at collection) gets the same tests.
TOWER_NAMES = TOWERS.names()

# Arguments a tower cannot do without (the rest are defaults); towers not listed take none.
ARGS = {
    "din": {"sequence": "history"},
    "dupn": {"sequence": "history", "lstm_hidden": 8, "attention": 8},
    "field_sum": {"groups": {"user": ["user_id"], "item": ["item_id", "history"]}},
}


def toy_input(batch: int = 5, width: int = 4, length: int = 3) -> tuple[InputShape, TowerInput]:
    torch.manual_seed(0)
    fields = {
        "user_id": torch.randn(batch, width),
        "item_id": torch.randn(batch, width),
        "history": torch.randn(batch, width),
    }
    mask = torch.tensor(
        [[True, True, False], [True, False, False], [False, False, False], [True, True, True], [True, False, False]]
    )[:batch]
    keys = torch.randn(batch, length, width)
    numeric = torch.randn(batch, 2)
    flat = torch.cat([*fields.values(), numeric], 1)
    shape = InputShape(
        flat_dim=flat.shape[1], field_dims={k: width for k in fields}, numeric_dim=2, sequence_fields=("history",)
    )
    return shape, TowerInput(flat=flat, fields=fields, numeric=numeric, sequences={"history": (keys, mask)})


def tower(name: str, **extra):
    shape, _ = toy_input()
    params = tuple((ARGS.get(name, {}) | extra).items())
    return build_tower(TowerSpec(type=name, params=params), shape, "funnel.tower")


def check_tower(name: str) -> None:
    """The check every registered tower gets: (B, out_dim) finite values, finite gradients."""
    _, x = toy_input()
    x.flat.requires_grad_(True)
    t = tower(name)
    h = t(x)
    assert h.shape == (5, t.out_dim) and torch.isfinite(h).all(), name
    h.sum().backward()
    assert x.flat.grad is None or torch.isfinite(x.flat.grad).all(), name
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in t.parameters()), name


def test_every_registered_tower_is_parametrised_and_the_argument_table_names_registered_towers():
    assert TOWERS.names() == TOWER_NAMES
    assert set(ARGS) <= set(TOWERS.names())
    assert {"mlp", "deepfm", "dcn", "din", "field_sum"} <= set(TOWER_NAMES)


@pytest.mark.parametrize("name", TOWER_NAMES)
def test_every_builtin_tower_gives_out_dim_finite_values(name):
    check_tower(name)


def _throwaway_tower(fill: float):
    class Throwaway(nn.Module):
        def __init__(self, shape: InputShape, width: int = 3):
            super().__init__()
            self.layer = nn.Linear(shape.flat_dim, width)
            self.fill = fill
            self.out_dim = width

        def forward(self, x: TowerInput) -> torch.Tensor:
            return torch.tanh(self.layer(x.flat)) + self.fill

    return Throwaway


def test_a_newly_registered_tower_gets_the_same_checks_and_a_broken_one_fails_them(frames):
    name = f"tmp_tower_{uuid.uuid4().hex[:8]}"
    assert name not in TOWER_NAMES
    try:
        register_tower(name)(_throwaway_tower(0.0))
        assert name in TOWERS.names()  # what TOWER_NAMES holds when the registering module is imported first
        check_tower(name)
        for funnel in FUNNELS:
            check_tower_in_model(frames, name, funnel)
        TOWERS._items[name] = _throwaway_tower(float("nan"))  # a tower that puts out NaN is caught
        with pytest.raises(AssertionError, match=name):
            check_tower(name)
    finally:
        del TOWERS._items[name]
    assert TOWERS.names() == TOWER_NAMES


def test_fm_term_is_the_sum_of_pairwise_inner_products():
    v = torch.tensor([[[1.0, 2.0], [3.0, -1.0], [0.5, 4.0]]])  # one row, three fields, width 2
    # <v0,v1> = 3 - 2 = 1; <v0,v2> = 0.5 + 8 = 8.5; <v1,v2> = 1.5 - 4 = -2.5
    assert fm_interaction(v).sum().item() == pytest.approx(1.0 + 8.5 - 2.5)
    assert fm_interaction(v)[0].tolist() == pytest.approx([3 + 0.5 + 1.5, -2 + 8 - 4])  # per dimension


def test_deepfm_puts_numerics_into_the_fm_as_value_scaled_vectors():
    _, x = toy_input()
    t = tower("deepfm")
    v = t.field_vectors(x)
    assert v.shape == (5, 3 + 2, 4)
    torch.testing.assert_close(v[:, 3], x.numeric[:, :1] * t.numeric_vectors[0])
    out = t(x)
    torch.testing.assert_close(out[:, -4:], fm_interaction(v))


def test_deepfm_needs_one_embedding_width():
    shape = InputShape(flat_dim=10, field_dims={"a": 4, "b": 6}, numeric_dim=0)
    with pytest.raises(ConfigError, match="one width"):
        build_tower(TowerSpec(type="deepfm"), shape, "funnel.tower")


def test_cross_layer_matches_its_formula():
    layer = CrossLayer(3)
    x0, x = torch.randn(2, 3), torch.randn(2, 3)
    want = x0 * (x @ layer.w.weight.T + layer.w.bias) + x
    torch.testing.assert_close(layer(x0, x), want)
    low = CrossLayer(3, low_rank=1)
    assert low(x0, x).shape == (2, 3)


def test_dcn_structures_have_the_documented_widths():
    assert tower("dcn", hidden=[8]).out_dim == 8 + 14  # parallel: cross output (flat width 14) beside the MLP
    assert tower("dcn", hidden=[8], structure="stacked").out_dim == 8


def test_din_padding_changes_nothing():
    _, x = toy_input()
    t = tower("din")
    t.eval()
    keys, mask = x.sequences["history"]
    noisy = keys.clone()
    noisy[~mask] = 100.0 * torch.randn(int((~mask).sum()), keys.shape[-1])  # garbage where padded
    changed = TowerInput(x.flat, x.fields, x.numeric, {"history": (noisy, mask)})
    torch.testing.assert_close(t(x), t(changed))
    # an all-padding row attends to nothing: zero interest vector
    assert t.attend(x.fields["item_id"], keys, mask)[2].abs().sum().item() == 0.0


def test_din_unnormalised_weights_are_masked_too():
    _, x = toy_input()
    t = tower("din", normalize="none")
    keys, mask = x.sequences["history"]
    noisy = keys.clone()
    noisy[~mask] = 7.0
    torch.testing.assert_close(t.attend(x.fields["item_id"], keys, mask), t.attend(x.fields["item_id"], noisy, mask))


def test_field_sum_adds_the_group_embeddings():
    _, x = toy_input()
    t = tower("field_sum", hidden=[])  # no layers: the output is the tower input itself
    out = t(x)
    torch.testing.assert_close(out[:, :4], x.fields["user_id"])
    torch.testing.assert_close(out[:, 4:8], x.fields["item_id"] + x.fields["history"])
    torch.testing.assert_close(out[:, 8:], x.numeric)


def test_fwfm_term_is_the_field_pair_weighted_sum_of_inner_products():
    v = torch.tensor([[[1.0, 2.0], [3.0, -1.0], [0.5, 4.0]]])  # <v0,v1> = 1, <v0,v2> = 8.5, <v1,v2> = -2.5
    r = torch.tensor([[9.0, 2.0, 0.5], [9.0, 9.0, -1.0], [9.0, 9.0, 9.0]])  # diagonal and lower triangle unused
    assert fwfm_interaction(v, r).sum().item() == pytest.approx(2.0 * 1.0 + 0.5 * 8.5 - 1.0 * -2.5)
    per_dim = [2 * 3 + 0.5 * 0.5 - 1.5, 2 * -2 + 0.5 * 8 + 4]  # Σ r_fg v_f ⊙ v_g, dimension by dimension
    assert fwfm_interaction(v, r)[0].tolist() == pytest.approx(per_dim)


def test_fwfm_with_unit_pair_weights_is_the_fm_and_nfwfm_starts_there():
    v = torch.randn(4, 5, 3)
    torch.testing.assert_close(fwfm_interaction(v, torch.ones(5, 5)), fm_interaction(v))
    _, x = toy_input()
    t = tower("nfwfm", hidden=[6])
    assert t.field_vectors(x).shape == (5, 3 + 2, 4) and t.out_dim == 6 + 4
    torch.testing.assert_close(t(x)[:, -4:], fm_interaction(t.field_vectors(x)))
    with torch.no_grad():
        t.pair_weights.copy_(torch.randn(5, 5))
    want = fwfm_interaction(t.field_vectors(x), t.pair_weights).sum(1, keepdim=True)
    scalar = tower("nfwfm", hidden=[6], interaction="scalar", first_order=True)
    scalar.load_state_dict(t.state_dict() | {"first": scalar.first})
    assert scalar.out_dim == 6 + 1 + 1
    torch.testing.assert_close(scalar(x)[:, 6:7], want)
    torch.testing.assert_close(scalar(x)[:, 7], (scalar.field_vectors(x) * scalar.first).sum((1, 2)))


def test_valid_first_moves_the_items_to_the_front_in_their_order():
    keys = torch.arange(1.0, 7.0).reshape(2, 3, 1)  # rows [1, 2, 3] and [4, 5, 6]
    mask = torch.tensor([[False, True, True], [True, False, True]])
    moved, moved_mask = valid_first(keys, mask)
    assert moved.squeeze(-1).tolist() == [[2.0, 3.0, 0.0], [4.0, 6.0, 0.0]]
    assert moved_mask.tolist() == [[True, True, False], [True, True, False]]


def test_dupn_lstm_is_torchs_lstm_written_out():
    torch.manual_seed(0)
    mine, ref = LSTM(4, 6, layers=2), nn.LSTM(4, 6, num_layers=2, batch_first=True)
    with torch.no_grad():
        for k in range(2):
            getattr(ref, f"weight_ih_l{k}").copy_(mine.inputs[k].weight)
            getattr(ref, f"bias_ih_l{k}").copy_(mine.inputs[k].bias)
            getattr(ref, f"weight_hh_l{k}").copy_(mine.recurrent[k].weight)
            getattr(ref, f"bias_hh_l{k}").zero_()
    x = torch.randn(3, 5, 4)
    torch.testing.assert_close(mine(x), ref(x)[0])


def test_dupn_ignores_padding_and_where_it_lies():
    _, x = toy_input()
    t = tower("dupn", hidden=[6])
    t.eval()
    keys, mask = x.sequences["history"]
    assert t(x).shape == (5, 6) and t.user_vector(x).shape == (5, 8)
    noisy = keys.clone()
    noisy[~mask] = 100.0 * torch.randn(int((~mask).sum()), keys.shape[-1])  # garbage where padded
    torch.testing.assert_close(t(x), t(TowerInput(x.flat, x.fields, x.numeric, {"history": (noisy, mask)})))
    # the encoder's right alignment (padding first) gives what the toy's left alignment gives
    right_keys, right_mask = keys.clone(), mask.clone()
    for row in range(5):
        n = int(mask[row].sum())
        right_keys[row], right_mask[row] = keys[row].roll(3 - n, 0), mask[row].roll(3 - n, 0)
    right = TowerInput(x.flat, x.fields, x.numeric, {"history": (right_keys, right_mask)})
    torch.testing.assert_close(t(x), t(right))
    assert t.user_vector(x)[2].abs().sum().item() == 0.0  # a row without history: no user vector


def test_nfwfm_and_dupn_refuse_inputs_they_cannot_use():
    mixed = InputShape(flat_dim=10, field_dims={"a": 4, "b": 6}, numeric_dim=0)
    with pytest.raises(ConfigError, match="nfwfm needs every categorical/sequence feature embedded at one width"):
        build_tower(TowerSpec(type="nfwfm"), mixed, "funnel.tower")
    with pytest.raises(ConfigError, match="dupn needs `sequence`.*sequence features: none"):
        build_tower(TowerSpec(type="dupn"), mixed, "funnel.tower")


@pytest.mark.parametrize(
    ("name", "args", "message"),
    [
        (
            "field_sum",
            {"groups": {"user": ["usr_id"]}},
            "'usr_id' is not a categorical or sequence feature. Did you mean \"user_id\"",
        ),
        ("din", {"sequence": "histroy"}, 'Did you mean "history"'),
        ("din", {"sequence": "history", "target": "user"}, "target 'user' is not a categorical feature"),
        ("mlp", {"activation": "rellu"}, 'Did you mean "relu"'),
        ("dcn", {"structure": "serial"}, "structure must be 'parallel' or 'stacked'"),
        ("nfwfm", {"interaction": "matrix"}, "interaction must be 'vector' or 'scalar'"),
        ("dupn", {"sequence": "histroy"}, 'Did you mean "history"'),
        ("dupn", {"query": ["usr_id"]}, "query field 'usr_id' is not a categorical or multi-hot feature. Did you mean"),
        ("dupn", {"query": []}, "dupn needs at least one `query` field"),
        ("dupn", {"lstm_hidden": 0}, "lstm_hidden must be a positive int"),
    ],
)
def test_bad_tower_arguments_say_what_to_do(name, args, message):
    shape, _ = toy_input()
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        build_tower(TowerSpec(type=name, params=tuple(args.items())), shape, "funnel.tower")


def test_unknown_tower_argument_is_caught_at_validation():
    raw = {
        "data": {"train": "t.csv"},
        "features": [{"name": "user_id", "kind": "categorical"}],
        "funnel": {"tower": {"type": "dcn", "cross_layer": 3}, "stages": [{"name": "click"}]},
    }
    with pytest.raises(
        ConfigError,
        match="funnel.tower.cross_layer: tower 'dcn' has no argument 'cross_layer'. Did you mean \"cross_layers\"",
    ):
        config_from_dict(raw)


# ---- every tower in every funnel model -------------------------------------------------------------

FEATURES = [
    {"name": "user_id", "kind": "categorical"},
    {"name": "item_id", "kind": "categorical"},
    {"name": "item_category", "kind": "categorical"},
    {"name": "history", "kind": "sequence", "share_with": "item_id", "max_len": 6},
    {"name": "price", "kind": "numeric", "transform": "log1p"},
]
FUNNELS = {
    "esmm": {
        "model": "esmm",
        "stages": [{"name": "click"}, {"name": "cart", "after": "click"}, {"name": "buy", "after": "cart"}],
    },
    "esm2": {
        "model": "esmm",
        "stages": [
            {"name": "click"},
            {"name": "cart", "after": "click"},
            {"name": "buy", "after": "click", "via": "cart"},
        ],
    },
    "aitm": {
        "model": "aitm",
        "stages": [{"name": "click"}, {"name": "cart", "after": "click"}, {"name": "buy", "after": "cart"}],
    },
}


@pytest.fixture(scope="module")
def frames():
    common = {
        "rows": 300,
        "n_users": 30,
        "n_items": 40,
        "stages": ("click", "cart", "buy"),
        "rates": (0.4, 0.5, 0.5),
        "history_len": 6,
    }
    return {"chain": generate(SyntheticSpec(**common)), "branch": generate(SyntheticSpec(**common, branch=True))}


def tower_model(frames, name: str, funnel: str):
    """Tower ``name`` in funnel ``funnel``, untrained (seed 0), with its featurizer and frame."""
    raw = {
        "data": {"train": "unused.csv"},
        "features": FEATURES,
        "funnel": copy.deepcopy(FUNNELS[funnel]) | {"embed_dim": 4, "tower": {"type": name, **ARGS.get(name, {})}},
    }
    cfg = config_from_dict(raw)
    graph = build_graph(cfg)
    frame = frames["branch" if funnel == "esm2" else "chain"]
    fz = Featurizer(cfg, graph).fit(frame)
    torch.manual_seed(0)
    return create_model(graph, cfg.funnel, fz.layout()), fz, frame


@pytest.mark.parametrize("funnel", sorted(FUNNELS))
@pytest.mark.parametrize("name", TOWER_NAMES)
def test_every_tower_in_every_model_reaches_the_shared_embeddings(frames, name, funnel):
    check_tower_in_model(frames, name, funnel)


def check_tower_in_model(frames, name: str, funnel: str) -> None:
    model, fz, frame = tower_model(frames, name, funnel)
    graph = model.graph
    batch = take(fz.encode(frame, "train").tensors(), slice(0, 64))
    out = model(batch)
    for stage in graph.names:
        assert out.log_reach[stage].shape == (64,) and torch.isfinite(out.log_reach[stage]).all()
    loss = model.loss(out, batch["labels"])
    loss.total.backward()
    for table in ("user_id", "item_id"):  # the history shares the item_id table
        grad = model.net.embeddings.table_grad(table)
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("funnel", sorted(FUNNELS))
@pytest.mark.parametrize("name", TOWER_NAMES)
def test_every_tower_in_every_model_scores_in_bf16_close_to_float32(frames, name, funnel):
    """`funnel predict --bf16`: dense layers cast to bfloat16 once, the rest under autocast."""
    from funnel.inference import dense_layers_to_bf16, predict_table

    model, fz, frame = tower_model(frames, name, funnel)
    table = fz.encode(frame.head(256), "train", labels=False)
    exact = predict_table(model, table, 100)
    fast = predict_table(dense_layers_to_bf16(copy.deepcopy(model)), table, 100, bf16=True)
    assert list(fast.columns) == list(exact.columns) and fast.notna().all().all()
    assert (fast - exact).abs().max().max() < 0.02


# ---- plug-ins -------------------------------------------------------------------------------------

PLUGIN = textwrap.dedent("""
    import torch
    from torch import nn
    from funnel.models import register_tower

    @register_tower("tmp_linear_tower")
    class Linear(nn.Module):
        def __init__(self, shape, width: int = 3):
            super().__init__()
            self.layer = nn.Linear(shape.flat_dim, width)
            self.out_dim = width

        def forward(self, x):
            return torch.tanh(self.layer(x.flat))
""")


def test_a_plugin_tower_from_a_temporary_module_is_used_from_yaml(tmp_path, monkeypatch):
    (tmp_path / "my_towers_tmp.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    raw = {
        "plugins": ["my_towers_tmp"],
        "data": {"train": "unused.csv"},
        "features": FEATURES[:2],
        "funnel": {
            "tower": {"type": "mlp"},
            "stages": [
                {"name": "click"},
                {"name": "buy", "after": "click", "tower": {"type": "tmp_linear_tower", "width": 5}},
            ],
        },
    }
    from funnel.spec.loader import import_plugins

    import_plugins(raw["plugins"])  # what the YAML loader does with `plugins:`
    cfg = config_from_dict(raw)
    graph = build_graph(cfg)
    frame = generate(SyntheticSpec(rows=100, n_users=10, n_items=10, stages=("click", "buy")))
    fz = Featurizer(cfg, graph).fit(frame)
    model = create_model(graph, cfg.funnel, fz.layout())
    assert type(model.net.towers["m_buy"]).__name__ == "Linear" and model.net.towers["m_buy"].out_dim == 5
    assert type(model.net.towers["m_click"]).__name__ == "MLPTower"
    bad = copy.deepcopy(raw)
    bad["funnel"]["stages"][1]["tower"]["widht"] = 2
    with pytest.raises(ConfigError, match="has no argument 'widht'. Did you mean \"width\""):
        config_from_dict(bad)
    sys.modules.pop("my_towers_tmp", None)
    TOWERS._items.pop("tmp_linear_tower", None)


def test_custom_tower_example_trains_from_yaml(tmp_path):
    import json
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [
            sys.executable,
            str(root / "examples/custom_tower.py"),
            "data.synthetic.rows=3000",
            "trainer.max_epochs=1",
            "trainer.enable_progress_bar=false",
            "trainer.log_every_n_steps=1",
            f"run_dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "custom_tower" in config and "gated_mlp" in config
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert 0 <= metrics["auc/click"] <= 1
