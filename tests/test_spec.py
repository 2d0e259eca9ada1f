"""Tests for funnel.spec: YAML -> frozen dataclasses, overrides, and error messages."""

from __future__ import annotations

import copy
import dataclasses
import re

import pytest

from funnel.errors import ConfigError, UserError
from funnel.spec import Config, config_from_dict, load_config
from funnel.spec.loader import apply_override

MINIMAL = {
    "data": {"train": "train.csv"},
    "features": [{"name": "user_id", "kind": "categorical"}],
    "funnel": {"stages": [{"name": "click"}, {"name": "conversion", "after": "click"}]},
}


def raw(**sections) -> dict:
    out = copy.deepcopy(MINIMAL)
    out.update(copy.deepcopy(sections))
    return out


def problems_of(mapping: dict, overrides: tuple[str, ...] = ()) -> str:
    mapping = copy.deepcopy(mapping)
    with pytest.raises(ConfigError) as err:
        for item in overrides:
            apply_override(mapping, item)
        config_from_dict(mapping)
    return str(err.value)


def with_overrides(mapping: dict, *overrides: str) -> Config:
    mapping = copy.deepcopy(mapping)
    for item in overrides:
        apply_override(mapping, item)
    return config_from_dict(mapping)


# ---- unknown keys, types, choices, required keys -------------------------------------------------


def test_minimal_config_fills_defaults():
    cfg = config_from_dict(copy.deepcopy(MINIMAL))
    assert cfg.stage_names() == ["click", "conversion"]
    assert cfg.funnel.model.type == "esmm" and cfg.funnel.embed_dim == 8
    # the resolved config: every argument of the model and the tower, defaults included
    assert cfg.funnel.model.kwargs == {
        "calibrator": 0.6,
        "compose": "product",
        "share_embeddings": True,
        "transfer": "none",
    }
    assert cfg.funnel.tower.kwargs == {"hidden": (128, 64), "activation": "relu", "dropout": 0.0, "batch_norm": False}
    assert cfg.optim.name == "adam" and cfg.optim.lr == 1e-3
    assert cfg.data.batch_size == 1024 and cfg.data.label_conflicts == "drop"
    assert cfg.trainer.kwargs == {"max_epochs": 10} and cfg.trainer.early_stopping == 2  # issue 14's defaults
    assert cfg.funnel.stages[1].label_column == "conversion"


def test_unknown_top_level_key_suggests_the_closest():
    msg = problems_of(raw(optm={"lr": 0.1}))
    assert msg.startswith("optm: unknown key.")
    assert 'Did you mean "optim"?' in msg


def test_unknown_trainer_key_suggests_max_epochs():
    msg = problems_of(raw(trainer={"max_epoch": 3}))
    assert "trainer.max_epoch" in msg and 'Did you mean "max_epochs"?' in msg


def test_unknown_nested_key_lists_allowed_keys():
    msg = problems_of(raw(optim={"lrate": 0.1}))
    assert (
        "optim.lrate: unknown key." in msg
        and "Allowed keys: name, lr, weight_decay, momentum, sparse_embeddings, sparse_min_rows, schedule, "
        "warmup_steps, min_lr_ratio, ema_decay, ema_warmup."
        in msg
    )


def test_wrong_type_names_the_key_and_the_value():
    assert problems_of(raw(optim={"lr": "abc"})) == "optim.lr: expected a number, got 'abc'."


def test_integer_key_rejects_a_fraction():
    assert problems_of(raw(seed=1.5)) == "seed: expected an integer, got 1.5."


def test_bad_literal_lists_the_choices_and_suggests_one():
    msg = problems_of(raw(optim={"name": "adamm"}))
    assert msg == "optim.name: 'adamm' is not one of adam, adamw, sgd, adagrad. Did you mean \"adam\"?"


def test_bad_feature_kind_suggests_categorical():
    msg = problems_of(raw(features=[{"name": "user_id", "kind": "categorial"}]))
    assert "features[0].kind: 'categorial' is not one of categorical, numeric, sequence, multi_hot." in msg
    assert 'Did you mean "categorical"?' in msg


def test_missing_required_section_is_named():
    mapping = {k: v for k, v in MINIMAL.items() if k != "funnel"}
    assert problems_of(mapping) == "funnel: required key is missing."


def test_missing_stage_name_is_named_with_its_index():
    msg = problems_of(raw(funnel={"stages": [{"name": "click"}, {"after": "click"}]}))
    assert "funnel.stages[1].name: required key is missing." in msg


def test_option_of_another_feature_kind_is_rejected():
    msg = problems_of(raw(features=[{"name": "price", "kind": "numeric", "min_count": 3}]))
    assert msg == (
        "features[0].min_count: a numeric feature does not take `min_count`. "
        "Its options: bins, embed_dim, embedding, frequencies, missing, sigma, transform."
    )


def test_value_checks_in_post_init_are_reported():
    msg = problems_of(raw(optim={"lr": -1.0}))
    assert "optim.lr must be positive, got -1.0" in msg


def test_several_problems_are_reported_in_one_error():
    mapping = raw(optm={}, optim={"lr": "abc", "name": "sgdd"}, trainer={"max_epoch": 3})
    with pytest.raises(ConfigError) as err:
        config_from_dict(mapping)
    assert len(err.value.problems) == 4
    msg = str(err.value)
    assert msg.startswith("4 problems found:")
    for expected in ('"optim"?', "optim.lr: expected a number", "'sgdd' is not one of", '"max_epochs"?'):
        assert expected in msg


def test_config_error_is_a_user_error():
    with pytest.raises(UserError):
        config_from_dict(raw(optm={}))


def test_monitor_must_be_a_logged_metric():
    msg = problems_of(raw(trainer={"monitor": "val/auc/convrsion"}))
    assert "trainer.monitor: 'val/auc/convrsion' is not a logged metric." in msg
    assert 'Did you mean "val/auc/conversion"?' in msg


# ---- registries ------------------------------------------------------------------------------------


def test_tower_arguments_are_checked_against_the_constructor():
    msg = problems_of(raw(funnel={**MINIMAL["funnel"], "tower": {"type": "mlp", "hiden": [4]}}))
    assert msg.startswith("funnel.tower.hiden: tower 'mlp' has no argument 'hiden'.")
    assert 'Did you mean "hidden"?' in msg and "Its arguments: hidden, activation, dropout, batch_norm." in msg


def test_stage_tower_arguments_are_checked_too():
    stages = [{"name": "click"}, {"name": "conversion", "after": "click", "tower": {"dropuot": 0.1}}]
    msg = problems_of(raw(funnel={"stages": stages}))
    assert "funnel.stages[1].tower.dropuot" in msg and 'Did you mean "dropout"?' in msg


def test_unknown_model_suggests_the_closest():
    msg = problems_of(raw(funnel={**MINIMAL["funnel"], "model": "esm"}))
    assert msg.startswith("funnel.model: unknown model 'esm'. Did you mean \"esmm\"?")
    assert "Registered: aitm, base, division, esmm, esmm_ns, naive." in msg


def test_unknown_tower_type_suggests_the_closest():
    msg = problems_of(raw(funnel={**MINIMAL["funnel"], "tower": {"type": "mlpp"}}))
    assert msg.startswith("funnel.tower.type: unknown tower 'mlpp'. Did you mean \"mlp\"?")


def test_tower_given_as_a_name_uses_default_arguments():
    cfg = config_from_dict(raw(funnel={**MINIMAL["funnel"], "tower": "mlp"}))
    assert cfg.funnel.tower.type == "mlp"
    assert cfg.funnel.tower.kwargs == {"hidden": (128, 64), "activation": "relu", "dropout": 0.0, "batch_norm": False}


def test_tower_arguments_are_kept_as_keyword_arguments():
    cfg = config_from_dict(raw(funnel={**MINIMAL["funnel"], "tower": {"hidden": [16, 8], "dropout": 0.1}}))
    # the given ones, and the tower's defaults for the rest (the resolved config)
    assert cfg.funnel.tower.kwargs == {"hidden": (16, 8), "dropout": 0.1, "activation": "relu", "batch_norm": False}


# ---- overrides ---------------------------------------------------------------------------------------


def test_override_sets_a_nested_value_with_its_yaml_type():
    cfg = with_overrides(MINIMAL, "optim.lr=0.05", "seed=7", "trainer.max_epochs=4", "optim.name=sgd")
    assert cfg.optim.lr == 0.05 and cfg.seed == 7 and cfg.optim.name == "sgd"
    assert cfg.trainer.kwargs["max_epochs"] == 4


def test_override_is_type_checked():
    assert problems_of(MINIMAL, ("optim.lr=abc",)) == "optim.lr: expected a number, got 'abc'."


def test_override_addresses_a_stage_by_name():
    cfg = with_overrides(MINIMAL, "funnel.stages.conversion.weight=2")
    assert [s.weight for s in cfg.funnel.stages] == [1.0, 2.0]


def test_override_addresses_a_stage_by_index():
    cfg = with_overrides(MINIMAL, "funnel.stages.0.weight=3", "funnel.stages.-1.label=buy")
    assert cfg.funnel.stages[0].weight == 3.0
    assert cfg.funnel.stages[1].label_column == "buy"


def test_override_of_an_unknown_key_suggests_the_closest():
    msg = problems_of(MINIMAL, ("optim.lrr=0.1",))
    assert msg.startswith("optim.lrr: unknown key.") and 'Did you mean "lr"?' in msg


def test_override_of_an_unknown_stage_lists_the_stages():
    msg = problems_of(MINIMAL, ("funnel.stages.convrsion.weight=2",))
    assert "no item named 'convrsion'" in msg and "Items: click, conversion." in msg
    assert 'Did you mean "conversion"?' in msg


def test_override_index_out_of_range_is_reported():
    msg = problems_of(MINIMAL, ("funnel.stages.5.weight=2",))
    assert "index 5 is out of range (the list has 2 items)" in msg


def test_override_without_equals_sign_is_rejected():
    msg = problems_of(MINIMAL, ("optim.lr",))
    assert "write it as key.sub=value" in msg


def test_override_of_the_tower_is_checked_against_the_constructor():
    msg = problems_of(MINIMAL, ("funnel.tower.hiden=[4]",))
    assert 'Did you mean "hidden"?' in msg


def test_file_overrides_defaults_and_command_line_overrides_file(write_config):
    path = write_config(raw(optim={"lr": 0.01, "weight_decay": 0.1}))
    cfg, resolved = load_config(path, ["optim.lr=0.02"])
    assert cfg.optim.lr == 0.02  # override beats file
    assert cfg.optim.weight_decay == 0.1  # file beats default
    assert cfg.optim.momentum == 0.0  # default
    assert resolved["optim"]["lr"] == 0.02


def test_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=re.escape("does not exist")):
        load_config(tmp_path / "nope.yaml")


def test_bad_yaml_syntax_is_a_config_error(write_config):
    path = write_config("funnel: {stages: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_top_level_list_is_rejected(write_config):
    path = write_config("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(path)


# ---- frozen dataclasses ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pick", "field"),
    [
        (lambda c: c, "seed"),
        (lambda c: c.optim, "lr"),
        (lambda c: c.data, "batch_size"),
        (lambda c: c.funnel, "model"),
        (lambda c: c.funnel.stages[0], "weight"),
        (lambda c: c.features[0], "min_count"),
        (lambda c: c.trainer, "monitor"),
    ],
)
def test_config_sections_are_frozen(pick, field):
    cfg = config_from_dict(copy.deepcopy(MINIMAL))
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(pick(cfg), field, 1)


def test_lists_become_tuples():
    cfg = config_from_dict(copy.deepcopy(MINIMAL))
    assert isinstance(cfg.features, tuple) and isinstance(cfg.funnel.stages, tuple)


# ---- synthetic data ----------------------------------------------------------------------------------

CHILD_FIRST = {"stages": [{"name": "conversion", "label": "buy", "after": "click"}, {"name": "click"}]}


def test_synthetic_stages_default_to_label_columns_parent_first():
    cfg = config_from_dict(raw(data={"synthetic": {"rows": 500}}, funnel=CHILD_FIRST))
    assert cfg.data.synthetic.stages == ("click", "buy")


def test_synthetic_funnel_listed_child_first_generates_no_label_conflicts():
    from funnel.data.sources import load_frames

    cfg = config_from_dict(raw(data={"synthetic": {"rows": 2000, "rates": [0.3, 0.5]}}, funnel=CHILD_FIRST))
    train = load_frames(cfg)["train"]
    assert train["click"].mean() == pytest.approx(0.3, abs=0.05)  # click is the first generated stage
    assert ((train["buy"] == 1) & (train["click"] == 0)).sum() == 0


def test_explicit_synthetic_stages_must_follow_the_funnel_order():
    ok = config_from_dict(raw(data={"synthetic": {"stages": ["click", "buy"]}}, funnel=CHILD_FIRST))
    assert ok.data.synthetic.stages == ("click", "buy")
    msg = problems_of(raw(data={"synthetic": {"stages": ["buy", "click"]}}, funnel=CHILD_FIRST))
    assert "data.synthetic.stages: ['buy', 'click'] must be the funnel's label columns ['click', 'buy']" in msg


def test_synthetic_data_and_file_paths_exclude_each_other():
    msg = problems_of(raw(data={"train": "t.csv", "synthetic": {}}))
    assert "data: `synthetic` and file paths exclude each other; keep one." in msg


def test_null_synthetic_means_no_generated_data():
    cfg = config_from_dict(raw(data={"train": "t.csv", "synthetic": None}))
    assert cfg.data.synthetic is None


def test_a_stage_that_is_not_a_mapping_is_reported_once():
    raw = copy.deepcopy(MINIMAL)
    raw["funnel"]["stages"] = ["click"]
    msg = problems_of(raw)
    assert "funnel.stages[0]: expected a mapping of keys, got 'click'." in msg
    assert "required key is missing" not in msg and "at least one stage" not in msg


def test_scientific_numbers_without_a_dot_are_numbers():
    """YAML 1.1 reads `lr: 1e-3` as the string "1e-3"; funnel accepts it where a number is expected."""
    from funnel.spec import config_from_dict

    raw = {
        "data": {"train": "x.csv"},
        "features": [{"name": "a", "kind": "categorical"}],
        "funnel": {"stages": [{"name": "click"}]},
        "optim": {"lr": "3e-3", "weight_decay": "1E-5"},
    }
    optim = config_from_dict(raw).optim
    assert optim.lr == 0.003 and optim.weight_decay == 1e-5
    raw["optim"]["lr"] = "fast"
    with pytest.raises(ConfigError, match="optim.lr: expected a number, got"):
        config_from_dict(raw)
