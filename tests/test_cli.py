"""End-to-end tests of the `funnel` command line, run in-process through funnel.cli.main."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from funnel.cli import main
from funnel.spec import config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("click", "conversion")
METRIC_KEYS = {f"{m}/{s}" for m in ("auc", "auc_cond", "logloss", "calib", "oracle_auc") for s in STAGES}


def run_cli(args: list[str]) -> tuple[int, str, str]:
    """main(args) with stdout and stderr captured, for module-scoped fixtures (no capsys there)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(args)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    return code, out.getvalue(), err.getvalue()


def e2e_config(data_dir: Path, run_dir: Path) -> dict:
    return {
        "seed": 0,
        "run_dir": str(run_dir),
        "data": {
            "train": str(data_dir / "train.csv"),
            "valid": str(data_dir / "valid.csv"),
            "test": str(data_dir / "test.csv"),
            "batch_size": 256,
        },
        "features": [
            {"name": "user_id", "kind": "categorical"},
            {"name": "item_id", "kind": "categorical"},
            {"name": "item_category", "kind": "categorical"},
            {"name": "device", "kind": "categorical"},
            {"name": "hour", "kind": "categorical"},
            {"name": "price", "kind": "numeric", "transform": "log1p"},
            {"name": "user_age", "kind": "numeric"},
            {"name": "n_prev_visits", "kind": "numeric", "transform": "log1p"},
        ],
        "funnel": {
            "model": "esmm",
            "embed_dim": 4,
            "tower": {"hidden": [8]},
            "stages": [{"name": "click"}, {"name": "conversion", "after": "click"}],
        },
        "optim": {"lr": 0.01},
        "trainer": {"max_epochs": 1, "enable_progress_bar": False, "log_every_n_steps": 1},
    }


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> SimpleNamespace:
    """`funnel synth` -> a config pointing at its CSVs -> `funnel fit`, once for this module."""
    base = tmp_path_factory.mktemp("e2e")
    code, synth_out, _ = run_cli(["synth", str(base / "data"), "--rows", "3000"])
    assert code == 0, synth_out
    config = base / "config.yaml"
    config.write_text(yaml.safe_dump(e2e_config(base / "data", base / "run")))
    code, out, err = run_cli(["fit", str(config)])
    assert code == 0, err
    return SimpleNamespace(
        base=base, data=base / "data", config=config, run=base / "run", synth_out=synth_out, out=out, err=err
    )


# ---- synth / fit ---------------------------------------------------------------------------------------


def test_synth_writes_three_splits_and_truth(fitted):
    data = fitted.data
    assert fitted.synth_out.split() == [str(data / f) for f in ("train.csv", "valid.csv", "test.csv", "truth.json")]
    assert [len(pd.read_csv(data / f"{s}.csv")) for s in ("train", "valid", "test")] == [2400, 300, 300]
    assert json.loads((data / "truth.json").read_text())["spec"]["rows"] == 3000


def test_fit_prints_the_run_directory_last(fitted):
    lines = fitted.out.strip().splitlines()
    assert lines[-1] == f"run directory: {fitted.run}"
    summary = json.loads("\n".join(lines[:-1]))
    assert summary["split"] == "test" and "auc/conversion" in summary


def test_fit_logs_to_stderr_not_stdout(fitted):
    assert "prepare: encoding train" in fitted.err and "prepare:" not in fitted.out


def test_run_directory_holds_config_encoders_checkpoint_and_metrics(fitted):
    for name in ("config.yaml", "encoders.json", "checkpoints/best.ckpt", "metrics.json"):
        assert (fitted.run / name).is_file(), name


def test_metrics_json_has_every_metric_of_every_stage(fitted):
    metrics = json.loads((fitted.run / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["rows"] == 300
    assert set(metrics) >= METRIC_KEYS
    for key in METRIC_KEYS:
        value = metrics[key]
        assert isinstance(value, float) and value > 0, key
        if key.startswith(("auc", "oracle_auc")):
            assert 0 < value < 1, key
    assert all(not isinstance(v, dict) for v in metrics.values()), "metrics.json keys are flat"
    valid = json.loads((fitted.run / "metrics_valid.json").read_text())
    assert valid["split"] == "valid" and valid["rows"] == 300 and set(valid) >= METRIC_KEYS


def test_fit_refuses_to_overwrite_a_non_empty_run_dir(fitted, capsys):
    before = (fitted.run / "metrics.json").read_text()
    assert main(["fit", str(fitted.config), f"run_dir={fitted.run}"]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert (fitted.run / "metrics.json").read_text() == before


def test_bad_trainer_argument_value_exits_2_and_leaves_no_run_dir(fitted, tmp_path, capsys):
    run_dir = tmp_path / "never"
    assert main(["fit", str(fitted.config), "trainer.accelerator=gpux", f"run_dir={run_dir}"]) == 2
    assert "trainer.accelerator: 'gpux'" in capsys.readouterr().err
    assert not run_dir.exists()


def test_saved_config_reloads_to_the_same_config(fitted):
    saved, _ = load_config(fitted.run / "config.yaml")
    original, _ = load_config(fitted.config)
    assert saved == original


def test_two_fits_with_the_same_seed_give_identical_metrics(fitted, tmp_path, capsys):
    assert main(["fit", str(fitted.config), f"run_dir={tmp_path / 'again'}"]) == 0
    first = json.loads((fitted.run / "metrics.json").read_text())
    second = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert first == second


def test_fit_with_the_embedded_synthetic_data(tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = [
        "fit",
        str(ROOT / "configs" / "esmm.yaml"),
        "data.synthetic.rows=2000",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1",
        "funnel.embed_dim=4",
        "funnel.tower.hidden=[8]",
        f"run_dir={run_dir}",
    ]
    assert main(args) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["rows"] == 200  # 10% of the 2,000 overridden rows
    assert {"oracle_auc/conversion", "auc_cond_es/conversion"} <= set(metrics)
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"run directory: {run_dir}"
    saved, _ = load_config(run_dir / "config.yaml")
    assert saved.data.synthetic.rows == 2000 and saved.data.synthetic.stages == STAGES


def test_print_config_prints_the_resolved_config_and_trains_nothing(fitted, tmp_path, capsys):
    run_dir = tmp_path / "never"
    assert main(["fit", str(fitted.config), "optim.lr=0.02", f"run_dir={run_dir}", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"] == {
        "name": "adam",
        "lr": 0.02,
        "weight_decay": 0.0,
        "momentum": 0.0,
        "sparse_embeddings": "auto",
        "sparse_min_rows": 1_000_000,
        "schedule": "constant",
        "warmup_steps": 0,
        "min_lr_ratio": 0.0,
        "ema_decay": 0.0,
        "ema_warmup": True,
    }
    assert printed["data"]["eval_batch_size"] == 16384  # defaults are written out
    # every tower argument, defaults included
    assert printed["funnel"]["tower"] == {
        "type": "mlp",
        "activation": "relu",
        "batch_norm": False,
        "dropout": 0.0,
        "hidden": [8],
    }
    assert config_from_dict(printed) == load_config(fitted.config, ["optim.lr=0.02", f"run_dir={run_dir}"])[0]
    assert not run_dir.exists()


def test_overrides_after_print_config_are_applied(fitted, capsys):
    assert main(["fit", str(fitted.config), "--print-config", "optim.lr=0.03"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["optim"]["lr"] == 0.03


def test_unknown_flag_is_a_usage_error(fitted):
    with pytest.raises(SystemExit) as exc:
        main(["fit", str(fitted.config), "--bogus"])
    assert exc.value.code == 2


# ---- evaluate / predict / check ------------------------------------------------------------------------------


def test_evaluate_reproduces_the_fit_metrics(fitted, tmp_path, capsys):
    out = tmp_path / "sub" / "m.json"
    assert main(["evaluate", str(fitted.run), "--data", str(fitted.data / "test.csv"), "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == written
    fit_metrics = json.loads((fitted.run / "metrics.json").read_text())
    assert set(written) >= METRIC_KEYS
    expected = {k: v for k, v in fit_metrics.items() if k not in ("split", "valid")}
    # fit scores the memory-mapped store, evaluate a table encoded in memory: the same values, but
    # float32 sums over other memory layouts may differ in the last bit, so the 6th decimal by one
    assert written == {k: (pytest.approx(v, abs=2e-6) if isinstance(v, float) else v) for k, v in expected.items()}


def test_evaluate_streams_chunks_with_the_metrics_of_one_pass(fitted):
    from funnel.data.io import read_table
    from funnel.inference import evaluate_table, evaluate_tables
    from funnel.runs import load_run

    cfg, _, featurizer, model = load_run(fitted.run)
    table = featurizer.encode(read_table(fitted.data / "test.csv"), "test")
    chunks = [table.select(torch.arange(a, min(a + 64, len(table)))) for a in range(0, len(table), 64)]
    assert evaluate_tables(model, chunks, 32) == evaluate_table(model, table, 32)  # batches of the same rows


@pytest.fixture(scope="module")
def predictions(fitted) -> pd.DataFrame:
    out = fitted.base / "p.csv"
    code, stdout, err = run_cli(
        ["predict", str(fitted.run), "--data", str(fitted.data / "test.csv"), "--out", str(out), "--keep", "user_id"]
    )
    assert code == 0, err
    assert stdout.strip() == f"predictions: {out}"
    return pd.read_csv(out)


def test_predict_writes_one_row_per_input_row_in_order(fitted, predictions):
    assert list(predictions.columns) == ["user_id", "p_click", "p_click_cond", "p_conversion", "p_conversion_cond"]
    source = pd.read_csv(fitted.data / "test.csv")
    assert len(predictions) == len(source) == 300
    assert predictions["user_id"].tolist() == source["user_id"].tolist()


def test_predicted_probabilities_multiply_along_the_funnel(predictions):
    p = predictions
    assert np.all(np.abs(p["p_conversion"] - p["p_click"] * p["p_conversion_cond"]) < 1e-5)
    np.testing.assert_array_equal(p["p_click"], p["p_click_cond"])
    for col in ("p_click", "p_conversion", "p_conversion_cond"):
        assert p[col].between(0, 1, inclusive="neither").all()
    assert (p["p_conversion"] <= p["p_click"]).all()


def test_predict_writes_parquet_with_the_same_values(fitted, predictions, tmp_path, capsys):
    out = tmp_path / "p.parquet"
    assert main(["predict", str(fitted.run), "--data", str(fitted.data / "test.csv"), "--out", str(out)]) == 0
    parquet = pd.read_parquet(out)
    assert list(parquet.columns) == ["p_click", "p_click_cond", "p_conversion", "p_conversion_cond"]
    np.testing.assert_allclose(parquet.to_numpy(), predictions.drop(columns="user_id").to_numpy(), rtol=1e-6)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_predict_streams_in_chunks_with_the_same_output(fitted, predictions, tmp_path, capsys, suffix):
    src = fitted.data / "test.csv"
    if suffix == ".parquet":  # a Parquet input is read by row batches
        src = tmp_path / "test.parquet"
        pd.read_csv(fitted.data / "test.csv").to_parquet(src, index=False)
    out = tmp_path / f"chunked{suffix}"
    args = [
        "predict",
        str(fitted.run),
        "--data",
        str(src),
        "--out",
        str(out),
        "--keep",
        "user_id",
        "--chunk-rows",
        "37",
        "--batch-size",
        "16",
    ]
    assert main(args) == 0
    chunked = pd.read_parquet(out) if suffix == ".parquet" else pd.read_csv(out)
    assert len(chunked) == 300  # 9 chunks of 37 rows and one of 4
    assert chunked["user_id"].tolist() == predictions["user_id"].tolist()
    np.testing.assert_allclose(
        chunked.drop(columns="user_id").to_numpy(), predictions.drop(columns="user_id").to_numpy(), rtol=1e-6
    )


def test_predict_names_missing_feature_columns_before_reading_rows(fitted, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    pd.read_csv(fitted.data / "test.csv").drop(columns=["user_id"]).to_csv(bad, index=False)
    assert main(["predict", str(fitted.run), "--data", str(bad), "--out", str(tmp_path / "p.csv")]) == 2
    err = capsys.readouterr().err
    assert "column 'user_id' is missing" in err and "Traceback" not in err
    assert not (tmp_path / "p.csv").exists()
    predict = ["predict", str(fitted.run), "--data", str(fitted.data / "test.csv"), "--out", str(tmp_path / "p.csv")]
    assert main([*predict, "--chunk-rows", "0"]) == 2
    assert "--chunk-rows must be >= 1" in capsys.readouterr().err
    assert main([*predict, "--batch-size", "0"]) == 2
    assert "--batch-size must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "p.csv").exists()


def test_predict_needs_no_label_columns(fitted, tmp_path, capsys):
    unlabeled = tmp_path / "x.csv"
    pd.read_csv(fitted.data / "test.csv").drop(columns=list(STAGES)).head(7).to_csv(unlabeled, index=False)
    assert main(["predict", str(fitted.run), "--data", str(unlabeled), "--out", str(tmp_path / "p.csv")]) == 0
    assert len(pd.read_csv(tmp_path / "p.csv")) == 7


def test_check_reports_rows_and_positives_per_split(fitted, capsys):
    assert main(["check", str(fitted.config)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == "config and data OK"
    report = json.loads("\n".join(out[:-1]))
    assert report["stages"] == list(STAGES)
    test = pd.read_csv(fitted.data / "test.csv")
    assert report["splits"]["test"] == {
        "rows": 300,
        "positives": {"click": int(test["click"].sum()), "conversion": int(test["conversion"].sum())},
        "conflicts": {"conversion": 0},
    }
    assert report["splits"]["train"]["rows"] == 2400


def test_python_m_funnel_help_lists_the_commands():
    result = subprocess.run(
        [sys.executable, "-m", "funnel", "--help"], capture_output=True, text=True, check=False, cwd=ROOT, timeout=120
    )
    assert result.returncode == 0, result.stderr
    for command in ("fit", "evaluate", "predict", "check", "synth"):
        assert command in result.stdout


# ---- bad input: exit code 2, a clear message, no traceback -----------------------------------------------


def assert_user_error(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert ("\n" + err).count("\nerror: ") == 1  # one error line (INFO logs may come before it)
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_bad_yaml_syntax_exits_2(write_config, capsys):
    path = write_config("data: {train: [x.csv\n")
    assert main(["fit", str(path)]) == 2
    assert_user_error(capsys, "not valid YAML")


def test_missing_config_file_exits_2(tmp_path, capsys):
    assert main(["check", str(tmp_path / "nope.yaml")]) == 2
    assert_user_error(capsys, "nope.yaml", "does not exist")


def test_unknown_key_exits_2_with_a_suggestion(fitted, capsys):
    assert main(["fit", str(fitted.config), "optm.lr=0.1"]) == 2
    assert_user_error(capsys, "optm: unknown key.", 'Did you mean "optim"?')


def test_cycle_in_stages_exits_2(fitted, capsys):
    args = ["fit", str(fitted.config), "funnel.stages.click.after=conversion"]
    assert main(args) == 2
    assert_user_error(capsys, "click -> conversion -> click form a cycle")


def test_missing_data_file_exits_2(base_config, write_config, tmp_path, capsys):
    base_config["data"]["valid"] = str(tmp_path / "gone.csv")
    assert main(["fit", str(write_config(base_config))]) == 2
    assert_user_error(capsys, "gone.csv", "does not exist")
    assert not (tmp_path / "run").exists()


def test_missing_column_exits_2_naming_it_and_leaves_no_run_dir(base_config, write_config, tmp_path, capsys):
    base_config["features"][0] = {"name": "user_idd", "kind": "categorical"}
    assert main(["fit", str(write_config(base_config))]) == 2
    assert_user_error(capsys, "column 'user_idd' is missing.", 'Did you mean "user_id"?')
    assert not (tmp_path / "run").exists()


def test_tower_rejecting_its_arguments_exits_2_and_leaves_no_run_dir(base_config, write_config, tmp_path, capsys):
    assert main(["fit", str(write_config(base_config)), "funnel.tower.activation=rellu"]) == 2
    assert_user_error(capsys, "funnel.stages.click.tower: tower 'mlp' rejected its arguments", 'Did you mean "relu"?')
    assert not (tmp_path / "run").exists()


def test_label_conflicts_under_error_exit_2(base_config, write_config, tmp_path, capsys):
    train = pd.read_csv(base_config["data"]["train"])
    unclicked = train.index[train["click"] == 0][:3]
    train.loc[unclicked, "conversion"] = 1  # conversions without a click
    train.to_csv(tmp_path / "train.csv", index=False)
    base_config["data"].update(train=str(tmp_path / "train.csv"), label_conflicts="error")
    path = write_config(base_config)
    assert main(["fit", str(path)]) == 2
    assert_user_error(capsys, "train: 3 label conflicts", "conversion: 3")
    assert not (tmp_path / "run").exists()
    assert main(["check", str(path)]) == 2
    assert_user_error(capsys, "train: 3 label conflicts under data.label_conflicts: error")


def test_evaluate_on_a_folder_that_is_not_a_run_exits_2(fitted, tmp_path, capsys):
    assert main(["evaluate", str(tmp_path), "--data", str(fitted.data / "test.csv")]) == 2
    assert_user_error(capsys, "is not a funnel run directory")


def test_run_without_its_checkpoint_exits_2(fitted, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(fitted.run, run)
    (run / "checkpoints" / "best.ckpt").unlink()
    assert main(["predict", str(run), "--data", str(fitted.data / "test.csv"), "--out", str(tmp_path / "p.csv")]) == 2
    assert_user_error(capsys, "no checkpoint at checkpoints/best.ckpt")
    assert not (tmp_path / "p.csv").exists()


@pytest.mark.parametrize("damage", ["garbage", "foreign", "reshaped"])
def test_a_corrupt_foreign_or_mismatched_checkpoint_exits_2(fitted, tmp_path, capsys, damage):
    import torch

    run = tmp_path / "run"
    shutil.copytree(fitted.run, run)
    ckpt = run / "checkpoints" / "best.ckpt"
    if damage == "garbage":
        ckpt.write_bytes(b"not a checkpoint")
        expected = "cannot be loaded as a checkpoint"
    elif damage == "foreign":
        torch.save({"weights": torch.zeros(2)}, ckpt)
        expected = "is not a funnel checkpoint"
    else:  # a table of another size, as if the encoders had been refitted
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        key = next(k for k in state["state_dict"] if ".fused." in k)
        state["state_dict"][key] = torch.zeros(3, 3)
        torch.save(state, ckpt)
        expected = "does not match the run's encoders and config"
    assert main(["predict", str(run), "--data", str(fitted.data / "test.csv"), "--out", str(tmp_path / "p.csv")]) == 2
    assert_user_error(capsys, expected)
    assert not (tmp_path / "p.csv").exists()


def test_keep_of_a_missing_column_exits_2(fitted, tmp_path, capsys):
    args = [
        "predict",
        str(fitted.run),
        "--data",
        str(fitted.data / "test.csv"),
        "--out",
        str(tmp_path / "p.csv"),
        "--keep",
        "user_id,nope",
    ]
    assert main(args) == 2
    assert_user_error(capsys, "--keep: column(s) nope not in")


def test_synth_with_zero_rows_exits_2(tmp_path, capsys):
    assert main(["synth", str(tmp_path / "d"), "--rows", "0"]) == 2
    assert_user_error(capsys, "rows=0: must be a positive int")
    assert not (tmp_path / "d").exists()


def test_an_unwritable_output_path_exits_2_without_traceback(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["synth", str(blocker / "out"), "--rows", "100"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err


def test_predict_bf16_stays_close_to_float32(fitted, predictions, tmp_path, capsys):
    out = tmp_path / "bf16.csv"
    assert main(["predict", str(fitted.run), "--data", str(fitted.data / "test.csv"), "--out", str(out), "--bf16"]) == 0
    bf16 = pd.read_csv(out)
    diff = (bf16[["p_click", "p_conversion"]] - predictions[["p_click", "p_conversion"]]).abs().to_numpy()
    assert diff.max() < 0.02 and np.all(bf16["p_conversion"] <= bf16["p_click"])


def test_a_loaded_run_holds_the_checkpoint_weights_and_no_meta_tensors(fitted):
    import torch

    from funnel.runs import BEST, _model_with, load_run

    _, _, _, model = load_run(fitted.run)
    state = torch.load(fitted.run / BEST, map_location="cpu", weights_only=True)["state_dict"]
    loaded = model.state_dict()
    assert loaded.keys() == {k.removeprefix("model.") for k in state if k.startswith("model.")}
    for key, value in loaded.items():
        assert not value.is_meta
        torch.testing.assert_close(value, state[f"model.{key}"], rtol=0, atol=0)

    class WithScratch(torch.nn.Module):  # state outside the state dict: rebuilt the ordinary way
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 1)
            self.register_buffer("scratch", torch.ones(2), persistent=False)

    weights = {"lin.weight": torch.tensor([[1.0, 2.0]]), "lin.bias": torch.tensor([3.0])}
    rebuilt = _model_with(weights, WithScratch, fitted.run / BEST)
    assert rebuilt.scratch.tolist() == [1.0, 1.0] and rebuilt.lin.weight.tolist() == [[1.0, 2.0]]
