"""`funnel export`: every registered model, tower and bottom exported to ONNX and TorchScript gives
what `funnel predict` gives on the same encoded rows, at two batch sizes; what cannot export says why."""

from __future__ import annotations

import copy
import json
import logging
import sys
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from funnel.cli import main
from funnel.data.table import take
from funnel.errors import UserError
from funnel.export import FORMATS, export_run, run_artefact
from funnel.export.graph import graph_inputs
from funnel.inference import predict_table
from funnel.models import MODELS, TOWERS, register_tower
from funnel.models.bottoms import BOTTOMS
from funnel.models.inputs import InputShape, TowerInput
from funnel.runs import load_run
from funnel.spec import config_from_dict
from funnel.synthetic import SyntheticSpec, write
from funnel.training.fit import fit_config
from tests.conftest import _csv_config
from tests.test_bottoms import PARAMS as BOTTOM_ARGS
from tests.test_towers import ARGS as TOWER_ARGS

log = logging.getLogger(__name__)

# Every feature block a graph can take: categorical ids, numerics, a sequence and a multi-hot list.
FEATURES = [
    {"name": "user_id", "kind": "categorical"},
    {"name": "item_id", "kind": "categorical"},
    {"name": "device", "kind": "categorical"},
    {"name": "price", "kind": "numeric", "transform": "log1p"},
    {"name": "n_prev_visits", "kind": "numeric", "transform": "log1p"},
    {"name": "history", "kind": "sequence", "share_with": "item_id", "max_len": 6},
    {"name": "tags", "kind": "multi_hot", "column": "history", "share_with": "item_id"},
    {"name": "rated", "kind": "multi_hot", "column": "history", "weights": "history_w", "share_with": "item_id"},
]
CHAIN = [{"name": "click"}, {"name": "conversion", "after": "click"}]
ESM2 = [{"name": "click"}, {"name": "cart", "after": "click"}, {"name": "buy", "after": "click", "via": "cart"}]

KWAY = [
    {"name": "click"},
    {"name": "cart", "after": "click", "group": "action"},
    {"name": "wish", "after": "click", "group": "action"},
    {"name": "buy", "after": "click", "via": "action"},
]
POSITION = {"name": "position", "kind": "categorical"}

# case -> (data, funnel keys[, extra features]): every model with the mlp tower, ESM² branches
# (two-way and k-way), a position-bias tower kept at inference, every other tower and every bottom
CASES = {f"model={m}": ("chain", {"model": m}) for m in MODELS.names()}
CASES["model=esmm,esm2"] = ("branch", {"model": "esmm", "stages": ESM2})
CASES["model=esmm,kway"] = ("kway", {"model": "esmm", "stages": KWAY})
CASES["bias_tower"] = ("chain", {"bias_tower": {"features": ["position"], "keep_at_inference": True}}, [POSITION])
CASES |= {
    f"tower={t}": ("chain", {"tower": {"type": t, **TOWER_ARGS.get(t, {})}}) for t in TOWERS.names() if t != "mlp"
}
CASES |= {f"bottom={b}": ("chain", {"bottom": {"type": b, **BOTTOM_ARGS.get(b, {})}}) for b in BOTTOMS.names()}
# a numeric feature as quantile bins: a CAT field with a table of its own (PLR: tests/test_numeric_embedding.py)
BINNED = {"name": "price_bins", "kind": "numeric", "column": "price", "embedding": "bins", "bins": 8}
CASES["numeric_bins"] = ("chain", {"tower": {"type": "deepfm", **TOWER_ARGS.get("deepfm", {})}}, [BINNED])
BATCHES = (7, 64)  # neither is the trace's batch of 3: the batch axis is dynamic


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export-data")
    common = {"rows": 800, "n_users": 40, "n_items": 30, "history_len": 6, "seed": 0}
    write(root / "chain", SyntheticSpec(**common, rates=(0.3, 0.4), positions=5))
    write(root / "branch", SyntheticSpec(**common, stages=("click", "cart", "buy"), rates=(0.4, 0.5, 0.5), branch=True))
    for csv in root.glob("*/*.csv"):  # a weight per history item, for the weighted multi-hot feature
        frame = pd.read_csv(csv)
        lengths = frame["history"].fillna("").map(lambda h: len(h.split("|")) if h else 0)
        frame["history_w"] = [("|".join(f"{0.5 + k / 4}" for k in range(n)) if n else "") for n in lengths]
        frame.to_csv(csv, index=False)
    rng = np.random.default_rng(0)
    (root / "kway").mkdir()
    for csv in (root / "branch").glob("*.csv"):  # a second member of the group: wish, exclusive with cart
        frame = pd.read_csv(csv)
        frame["wish"] = ((frame["click"] == 1) & (frame["cart"] == 0) & (rng.random(len(frame)) < 0.4)).astype(int)
        frame.to_csv(root / "kway" / csv.name, index=False)
    return {"chain": root / "chain", "branch": root / "branch", "kway": root / "kway"}


def raw_config(data_dir: Path, run_dir: Path, funnel: dict, extra: list | tuple = ()) -> dict:
    cfg = _csv_config(data_dir, run_dir)  # the tiny CSV config of conftest, with this file's features
    cfg["features"] = copy.deepcopy([*FEATURES, *extra])
    cfg["funnel"] = {"embed_dim": 4, "tower": {"type": "mlp", "hidden": [8]}, "stages": CHAIN, **funnel}
    return cfg


@pytest.fixture(scope="session")
def runs(data, tmp_path_factory):
    """case -> its run directory, trained once (1 epoch) on first use."""
    made: dict[str, Path] = {}

    def run_of(case: str) -> Path:
        if case not in made:
            kind, funnel, *extra = CASES[case]
            raw = raw_config(data[kind], tmp_path_factory.mktemp("runs"), funnel, *extra)
            made[case] = fit_config(config_from_dict(raw))
        return made[case]

    return run_of


def encoded_test_rows(run_dir: Path, data_dir: Path):
    cfg, graph, featurizer, model = load_run(run_dir)
    table = featurizer.encode(pd.read_csv(data_dir / "test.csv"), "test", labels=False)
    lengths = {f.name: f.max_len for f in cfg.features if f.kind == "sequence"}
    return model, table, graph_inputs(featurizer.layout(), lengths)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_the_exported_graph_gives_what_predict_gives_at_every_batch_size(runs, data, tmp_path, case, fmt):
    run_dir = runs(case)
    out = export_run(run_dir, fmt, tmp_path / "export")
    manifest = json.loads((out / "manifest.json").read_text())
    model, table, inputs = encoded_test_rows(run_dir, data[CASES[case][0]])
    want = predict_table(model, table)
    assert [o["name"] for o in manifest["outputs"]] == list(want.columns)
    assert [i["name"] for i in manifest["inputs"]] == [i.name for i in inputs]
    worst = 0.0
    for rows in BATCHES:
        batch = take(table.tensors(), slice(0, rows))
        got = run_artefact(fmt, out / manifest["file"], inputs, tuple(batch[i.key] for i in inputs))
        for column, values in zip(want.columns, got, strict=True):
            assert values.shape == (rows,), column
            diff = (
                (values.double() - torch.tensor(want[column].to_numpy()[:rows], dtype=torch.float64)).abs().max().item()
            )
            worst = max(worst, diff)
    log.info("parity %s %s: max abs diff %.3g", case, fmt, worst)
    assert worst <= 1e-5, (case, fmt, worst)


def test_the_manifest_names_every_input_column_and_the_cli_writes_the_artefact(runs, tmp_path, capsys):
    run_dir = runs("model=esmm")
    out = tmp_path / "onnx"
    assert main(["export", str(run_dir), "--format", "onnx", "--out", str(out)]) == 0
    assert f"export: {out}" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["encoders.json", "manifest.json", "model.onnx"]
    assert (out / "encoders.json").read_text() == (run_dir / "encoders.json").read_text()
    m = json.loads((out / "manifest.json").read_text())
    assert m["format"] == "onnx" and m["stages"] == ["click", "conversion"] and m["funnel_version"]
    inputs = {i["name"]: i for i in m["inputs"]}
    assert list(inputs) == [
        "cat",
        "num",
        "seq__history",
        "bag__tags__ids",
        "bag__tags__offsets",
        "bag__rated__ids",
        "bag__rated__offsets",
        "bag__rated__weights",
    ]
    assert inputs["cat"]["columns"] == ["user_id", "item_id", "device"]
    assert inputs["cat"]["dtype"] == "int64" and inputs["cat"]["shape"] == ["batch", 3]
    # the synthetic n_prev_visits has gaps in train: its missing flag is a column of its own
    num = [(c["feature"], c["holds"]) for c in inputs["num"]["columns"]]
    assert num == [("price", "value"), ("n_prev_visits", "value"), ("n_prev_visits", "missing_flag")]
    assert inputs["num"]["dtype"] == "float32" and inputs["num"]["shape"] == ["batch", 3]
    assert inputs["seq__history"]["shape"] == ["batch", 6] and inputs["seq__history"]["feature"] == "history"
    assert inputs["bag__tags__ids"]["shape"] == ["nnz_tags"] and inputs["bag__tags__offsets"]["shape"] == ["batch+1"]
    assert inputs["bag__rated__weights"]["dtype"] == "float32" and inputs["bag__rated__weights"]["feature"] == "rated"
    assert [o["name"] for o in m["outputs"]] == ["p_click", "p_click_cond", "p_conversion", "p_conversion_cond"]


def test_export_refuses_a_non_empty_out_a_file_out_and_a_folder_that_is_no_run(runs, tmp_path, capsys):
    run_dir = runs("model=esmm")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    assert main(["export", str(run_dir), "--format", "torchscript", "--out", str(full)]) == 2
    assert "is not empty" in capsys.readouterr().err and (full / "keep.txt").read_text() == "mine"
    file = tmp_path / "file"
    file.write_text("x")
    assert main(["export", str(run_dir), "--format", "torchscript", "--out", str(file)]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--format", "onnx", "--out", str(tmp_path / "new")]) == 2
    assert "not a funnel run directory" in capsys.readouterr().err
    with pytest.raises(UserError, match='Did you mean "onnx"'):
        export_run(run_dir, "onx", tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_an_empty_out_folder_is_filled(runs, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    export_run(runs("model=esmm"), "torchscript", empty)
    assert (empty / "model.pt").is_file()


def _tower(forward):
    class Tower(nn.Module):
        def __init__(self, shape: InputShape, width: int = 3):
            super().__init__()
            self.layer = nn.Linear(shape.flat_dim, width)
            self.out_dim = width

        def forward(self, x: TowerInput) -> torch.Tensor:
            return forward(self.layer(x.flat))

    return Tower


def _value_dependent(h: torch.Tensor) -> torch.Tensor:
    return torch.tanh(h) if h.mean() > 0 else torch.relu(h)  # Python branches on a value


def _cummax(h: torch.Tensor) -> torch.Tensor:
    return torch.cummax(h, dim=1).values  # no ONNX symbolic for aten::cummax


@pytest.fixture
def plugin_run(data, tmp_path):
    """run_of(forward) -> a run whose tower is a throwaway registered tower computing ``forward``."""
    names = []

    def run_of(forward) -> tuple[str, Path]:
        name = f"tmp_tower_{uuid.uuid4().hex[:8]}"
        register_tower(name)(_tower(forward))
        names.append(name)
        raw = raw_config(data["chain"], tmp_path / name, {"tower": {"type": name}})
        return name, fit_config(config_from_dict(raw))

    yield run_of
    for name in names:
        TOWERS._items.pop(name, None)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_tower_that_branches_on_values_in_python_is_refused_with_its_name(plugin_run, tmp_path, fmt):
    name, run_dir = plugin_run(_value_dependent)
    with pytest.raises(UserError, match=rf"tower '{name}' cannot be exported: its forward depends on the values"):
        export_run(run_dir, fmt, tmp_path / "new" / "out")
    assert not (tmp_path / "new").exists()  # nothing half-written, not even the folder made for it


def test_an_op_onnx_lacks_is_named_and_torchscript_still_exports_it(plugin_run, tmp_path, capfd):
    name, run_dir = plugin_run(_cummax)
    capfd.readouterr()
    with pytest.raises(UserError, match=rf"tower '{name}' cannot be exported to ONNX: .*'aten::cummax'.*torchscript"):
        export_run(run_dir, "onnx", tmp_path / "onnx")
    assert "Torch IR graph" not in capfd.readouterr().err  # the exporter's graph dump is held back
    assert not (tmp_path / "onnx").exists()
    assert main(["export", str(run_dir), "--format", "onnx", "--out", str(tmp_path / "onnx")]) == 2
    assert "aten::cummax" in capfd.readouterr().err
    export_run(run_dir, "torchscript", tmp_path / "ts")
    assert (tmp_path / "ts" / "model.pt").is_file()


def test_onnx_without_its_optional_packages_says_how_to_install_them(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    with pytest.raises(UserError, match=r"pip install 'funnel\[export\]'"):
        export_run(tmp_path / "any-run", "onnx", tmp_path / "out")
    assert not (tmp_path / "out").exists()
