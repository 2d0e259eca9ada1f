"""The Python API: fit, load_run, Run.predict / Run.evaluate give what the CLI gives."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

import funnel
from funnel.cli import main
from funnel.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(make_config, tmp_path_factory) -> funnel.Run:
    base = tmp_path_factory.mktemp("api")
    return funnel.fit(make_config(base / "run"), ["optim.lr=0.02"])


def test_fit_from_a_mapping_with_overrides_returns_the_finished_run(run):
    assert run.stages == ["click", "conversion"]
    assert run.config.optim.lr == 0.02
    assert (run.path / "checkpoints" / "best.ckpt").is_file()
    assert json.loads((run.path / "run.json").read_text())["status"] == "complete"
    assert run.metrics["split"] == "test"


def test_predict_returns_the_columns_and_values_of_funnel_predict(run, synth_dir, tmp_path):
    test = pd.read_csv(synth_dir / "test.csv")
    out = tmp_path / "p.csv"
    assert main(["predict", str(run.path), "--data", str(synth_dir / "test.csv"), "--out", str(out)]) == 0
    cli = pd.read_csv(out)
    frame = test.drop(columns=["click", "conversion"]).set_index(pd.RangeIndex(100, 100 + len(test)))
    api = funnel.load_run(run.path).predict(frame)
    assert list(api.columns) == list(cli.columns) == ["p_click", "p_click_cond", "p_conversion", "p_conversion_cond"]
    assert list(api.index) == list(frame.index)  # aligned with the input rows
    pd.testing.assert_frame_equal(api.reset_index(drop=True), cli, check_dtype=False, check_exact=False, atol=1e-6)


def test_evaluate_returns_the_metrics_of_funnel_evaluate(run, synth_dir, capsys):
    assert main(["evaluate", str(run.path), "--data", str(synth_dir / "test.csv")]) == 0
    cli = json.loads(capsys.readouterr().out)
    assert run.evaluate(pd.read_csv(synth_dir / "test.csv")) == cli


def test_export_writes_the_artefact_of_funnel_export(run, tmp_path):
    out = run.export(tmp_path / "ts", format="torchscript")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"] == ["click", "conversion"] and (out / "model.pt").is_file()
    with pytest.raises(UserError, match="onnx"):
        run.export(tmp_path / "bad", format="onxx")


def test_bad_input_raises_a_user_error_that_names_the_problem(run, synth_dir):
    with pytest.raises(UserError, match="user_id"):
        run.predict(pd.read_csv(synth_dir / "test.csv").drop(columns=["user_id"]))
    with pytest.raises(UserError, match="DataFrame"):
        run.predict([1, 2, 3])
    with pytest.raises(UserError, match="funnel run directory"):
        funnel.load_run(synth_dir)


def test_the_readme_example_runs(tmp_path, monkeypatch):
    """The README's Python example, run as written (with a small synthetic funnel)."""
    text = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(import funnel\n.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "esmm.yaml").write_text((ROOT / "configs" / "esmm.yaml").read_text())
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102  (the project's own README)
    assert set(scope["scores"].columns) >= {"p_click", "p_conversion_cond"}
    assert scope["metrics"]["rows"] == len(scope["frame"])
