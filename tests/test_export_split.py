"""`funnel export --split`: the user graph and the item graph together give what the whole model
gives, for every registered model, tower and bottom, in both formats, with one user broadcast over
the candidates and with a user row per candidate; bad splits are refused."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pandas as pd
import pytest
import torch

from funnel.cli import main
from funnel.data.table import take
from funnel.errors import UserError
from funnel.export import FORMATS, export_run, run_artefact
from funnel.export.graph import ExportGraph
from funnel.export.sides import join_batches, split_batch
from funnel.inference import predict_table
from tests.test_export import CASES, data, encoded_test_rows, runs  # noqa: F401  (fixtures)

log = logging.getLogger(__name__)

# the user and the request: ids, a numeric with a missing flag, the history sequence, one multi-hot
# list (the item table is read on both sides: the history shares item_id's)
USER = ["user_id", "n_prev_visits", "history", "tags"]
SPLIT = "user=" + ",".join(USER)
SPLIT_CASES = sorted(c for c in CASES if c != "bias_tower")


def _graphs(out: Path) -> tuple[dict, dict, dict]:
    manifest = json.loads((out / "manifest.json").read_text())
    user, item = (manifest["graphs"][g] for g in ("user", "item"))
    return manifest, user, item


def _run(fmt: str, out: Path, graph: dict, tensors: tuple) -> list[torch.Tensor]:
    from funnel.export.graph import GraphInput

    inputs = [GraphInput(i["name"], i["name"], i["dtype"], tuple(i["shape"])) for i in graph["inputs"]]
    return run_artefact(fmt, out / graph["file"], inputs, tensors)


def _sides(run_dir: Path):
    from funnel.export.sides import make_sides
    from funnel.export.split_export import used_features
    from funnel.runs import load_run

    cfg, _, featurizer, model = load_run(run_dir)
    lengths = {f.name: f.max_len for f in cfg.features if f.kind == "sequence"}
    return make_sides(featurizer, used_features(featurizer, model, "the model"), USER, lengths)


def _split_outputs(run_dir: Path, data_dir: Path, out: Path) -> tuple[list[torch.Tensor], pd.DataFrame]:
    """The split ONNX pair's outputs on the run's test rows (a user row per candidate), and
    what `funnel predict` gives on them."""
    out = export_run(run_dir, "onnx", out, split=USER)
    _, user_graph, item_graph = _graphs(out)
    model, table, _ = encoded_test_rows(run_dir, data_dir)
    sides = _sides(run_dir)
    user, items = split_batch(table.tensors(), sides[0]), split_batch(table.tensors(), sides[1])
    state = _run("onnx", out, user_graph, tuple(user[i.key] for i in sides[0].inputs))
    return _run("onnx", out, item_graph, (*state, *(items[i.key] for i in sides[1].inputs))), predict_table(
        model, table
    )


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", SPLIT_CASES)
def test_user_and_item_graphs_give_what_predict_gives(runs, data, tmp_path, case, fmt):  # noqa: F811  (the fixtures of test_export)
    run_dir = runs(case)
    out = export_run(run_dir, fmt, tmp_path / "split", split=SPLIT)
    manifest, user_graph, item_graph = _graphs(out)
    model, table, inputs = encoded_test_rows(run_dir, data[CASES[case][0]])
    want = predict_table(model, table)
    assert [o["name"] for o in manifest["outputs"]] == list(want.columns)
    sides = _sides(run_dir)
    user_keys = [i.key for i in sides[0].inputs]
    item_keys = [i.key for i in sides[1].inputs]
    rows = 37
    batch = take(table.tensors(), slice(0, rows))
    # a user row per candidate: the test rows as they are, cut in two
    user, items = split_batch(batch, sides[0]), split_batch(batch, sides[1])
    state = _run(fmt, out, user_graph, tuple(user[k] for k in user_keys))
    got = _run(fmt, out, item_graph, (*state, *(items[k] for k in item_keys)))
    worst = 0.0
    for column, values in zip(want.columns, got, strict=True):
        assert values.shape == (rows,), column
        expect = torch.tensor(want[column].to_numpy()[:rows], dtype=torch.float64)
        worst = max(worst, (values.double() - expect).abs().max().item())
    # one user (test row 3) for every candidate: against the whole graph on the joined rows
    one = {k: (v[3:4] if not k.startswith("bag/") else v) for k, v in user.items()}
    for f in sides[0].layout.fields_in("bag"):  # row 3's list alone
        offsets = user[f"bag/{f.name}/offsets"]
        lo, hi = int(offsets[3]), int(offsets[4])
        one[f"bag/{f.name}"] = user[f"bag/{f.name}"][lo:hi]
        one[f"bag/{f.name}/offsets"] = torch.tensor([0, hi - lo])
        if f.weighted:
            one[f"bag/{f.name}/weights"] = user[f"bag/{f.name}/weights"][lo:hi]
    joined = join_batches(sides, one, items)
    whole = ExportGraph(model, inputs).eval()
    with torch.no_grad():
        expect_one = whole(*(joined[i.key] for i in inputs))
    state = _run(fmt, out, user_graph, tuple(one[k] for k in user_keys))
    assert all(s.shape[0] == 1 for s in state)
    got = _run(fmt, out, item_graph, (*state, *(items[k] for k in item_keys)))
    for g, w in zip(got, expect_one, strict=True):
        assert g.shape == (rows,)
        worst = max(worst, (g.double() - w.double()).abs().max().item())
    log.info("split parity %s %s: max abs diff %.3g", case, fmt, worst)
    assert worst <= 1e-5, (case, fmt, worst)


# tower shapes beside the registry's defaults: a low-rank stacked DCN, DeepFM without numerics in
# the FM part, towers with no hidden layer (no first linear layer: whole per candidate)
VARIANTS = {
    "dcn-stacked-low-rank": {"tower": {"type": "dcn", "hidden": [8], "low_rank": 3, "structure": "stacked"}},
    "deepfm-no-numeric-fm": {"tower": {"type": "deepfm", "hidden": [8], "numeric_in_fm": False}},
    "mlp-no-hidden": {"tower": {"type": "mlp", "hidden": []}},
    "field_sum-no-hidden": {"tower": {"type": "field_sum", "hidden": [], "groups": {"g": ["item_id", "history"]}}},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_tower_variants_split_exactly(data, tmp_path, variant):  # noqa: F811  (the fixtures of test_export)
    from funnel.spec import config_from_dict
    from funnel.training.fit import fit_config
    from tests.test_export import raw_config

    run_dir = fit_config(config_from_dict(raw_config(data["chain"], tmp_path / "run", VARIANTS[variant])))
    got, want = _split_outputs(run_dir, data["chain"], tmp_path / "split")
    worst = max(
        (g.double() - torch.tensor(want[c].to_numpy())).abs().max().item() for g, c in zip(got, want, strict=True)
    )
    assert worst <= 1e-5, (variant, worst)


def test_an_mlp_tower_caches_only_its_first_layer_and_the_manifest_describes_both_graphs(runs, tmp_path, capsys):  # noqa: F811  (the fixtures of test_export)
    run_dir = runs("model=esmm")
    out = tmp_path / "cli"
    assert main(["export", str(run_dir), "--format", "onnx", "--out", str(out), "--split", SPLIT]) == 0
    assert f"export: {out}" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["encoders.json", "item.onnx", "manifest.json", "user.onnx"]
    manifest, user_graph, item_graph = _graphs(out)
    assert manifest["split"] == {"user": USER, "item": ["item_id", "device", "price", "rated"]}
    assert "file" not in manifest and "inputs" not in manifest
    assert [i["name"] for i in user_graph["inputs"]] == [
        "cat",
        "num",
        "seq__history",
        "bag__tags__ids",
        "bag__tags__offsets",
    ]
    by_name = {i["name"]: i for i in user_graph["inputs"]}
    assert by_name["cat"]["columns"] == ["user_id"] and by_name["cat"]["shape"] == ["batch", 1]
    assert [(c["feature"], c["holds"]) for c in by_name["num"]["columns"]] == [
        ("n_prev_visits", "value"),
        ("n_prev_visits", "missing_flag"),
    ]
    # the user state of an MLP tower is its first layer's user part (hidden [8]): nothing else
    state = [(o["name"], o["shape"]) for o in user_graph["outputs"]]
    assert state == [("user__m_click__0", ["batch", 8]), ("user__m_conversion__0", ["batch", 8])]
    items = {i["name"]: i for i in item_graph["inputs"]}
    assert list(items) == [
        "user__m_click__0",
        "user__m_conversion__0",
        "cat",
        "num",
        "bag__rated__ids",
        "bag__rated__offsets",
        "bag__rated__weights",
    ]
    assert items["user__m_click__0"]["shape"] == ["users", 8] and "from" in items["user__m_click__0"]
    assert items["cat"]["columns"] == ["item_id", "device"]
    assert [c["feature"] for c in items["num"]["columns"]] == ["price"]
    assert [o["name"] for o in item_graph["outputs"]] == [o["name"] for o in manifest["outputs"]]


@pytest.mark.parametrize(
    ("split", "message"),
    [
        ("user=user_idd", r"'user_idd' is not a feature the model reads\. Did you mean \"user_id\""),
        ("user=click", r"'click' is not a feature the model reads"),
        ("item=item_id", r"is not `user=FEATURE,FEATURE,...`"),
        ("user=", r"is not `user=FEATURE,FEATURE,...`"),
        (
            "user=user_id,item_id,device,price,n_prev_visits,history,tags,rated",
            r"every feature is on the user side",
        ),
    ],
)
def test_a_bad_split_exits_2_and_writes_nothing(runs, tmp_path, capsys, split, message):  # noqa: F811  (the fixtures of test_export)
    out = tmp_path / "new" / "out"
    assert main(["export", str(runs("model=esmm")), "--format", "onnx", "--out", str(out), "--split", split]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "Traceback" not in err and not (tmp_path / "new").exists()


def test_a_position_bias_tower_kept_at_inference_is_refused_with_the_reason(runs, tmp_path):  # noqa: F811  (the fixtures of test_export)
    with pytest.raises(UserError, match=r"position-bias tower is kept at inference .* without --split"):
        export_run(runs("bias_tower"), "torchscript", tmp_path / "out", split=SPLIT)
    assert not (tmp_path / "out").exists()


def test_a_split_that_does_not_reproduce_the_model_is_refused(runs, tmp_path, monkeypatch):  # noqa: F811  (the fixtures of test_export)
    """The check before publishing compares the pair with the whole model on random rows."""
    from funnel.export import split_towers

    real = split_towers.MLPSplit.item

    def off_by_one(self, cached, xi, whole):
        return real(self, cached, xi, whole) + 1.0

    monkeypatch.setattr(split_towers.MLPSplit, "item", off_by_one)
    with pytest.raises(UserError, match=r"split onnx graphs give outputs .* away from the whole model's"):
        export_run(runs("model=esmm"), "onnx", tmp_path / "out", split=SPLIT)
    assert not (tmp_path / "out").exists()


def test_the_python_api_exports_a_split(runs, tmp_path):  # noqa: F811  (the fixtures of test_export)
    from funnel.api import load_run

    out = load_run(runs("model=esmm")).export(tmp_path / "api", "torchscript", split=USER)
    assert sorted(p.name for p in out.iterdir()) == ["encoders.json", "item.pt", "manifest.json", "user.pt"]


def test_plr_numeric_embeddings_split_with_their_side(data, tmp_path):  # noqa: F811  (the fixtures of test_export)
    from funnel.spec import config_from_dict
    from funnel.training.fit import fit_config
    from tests.test_export import raw_config

    raw = raw_config(data["chain"], tmp_path / "run", {"tower": {"type": "deepfm", "hidden": [8]}})
    for f in raw["features"]:  # one PLR feature on each side: n_prev_visits (user), price (item)
        if f["name"] in ("price", "n_prev_visits"):
            f.update({"embedding": "plr", "frequencies": 4})
    run_dir = fit_config(config_from_dict(raw))
    got, want = _split_outputs(run_dir, data["chain"], tmp_path / "split")
    worst = max(
        (g.double() - torch.tensor(want[c].to_numpy())).abs().max().item() for g, c in zip(got, want, strict=True)
    )
    assert worst <= 1e-5, worst
