"""Command-line conventions: results on stdout, logs and progress bars on stderr, -q/-v anywhere,
help for every option with its default, --version, Lightning's loggers by name, and one copy of
the best checkpoint."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

import funnel
from funnel.cli import _parser, main
from funnel.runs import BEST, LAST
from funnel.spec import config_from_dict
from funnel.training import fit as fit_module
from funnel.training import loggers
from tests.test_cli import run_cli


def _config(make_config, run_dir: Path, **trainer) -> dict:
    cfg = make_config(run_dir)
    cfg["trainer"].pop("enable_progress_bar")  # the default: a bar, unless -q
    cfg["trainer"].update(trainer)
    return cfg


def _write(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _result_lines(out: str, run_dir: Path) -> None:
    """stdout is the JSON summary and the run directory line, nothing else."""
    assert "\r" not in out and "Epoch" not in out and "it/s" not in out
    assert out.rstrip().endswith(f"run directory: {run_dir}")
    assert out.lstrip().startswith("{")


@pytest.fixture(scope="module")
def fitted(make_config, tmp_path_factory) -> SimpleNamespace:
    """One `funnel fit` with the progress bar on (the default), stdout and stderr captured."""
    base = tmp_path_factory.mktemp("conventions")
    config = _write(_config(make_config, base / "run"), base / "config.yaml")
    code, out, err = run_cli(["fit", str(config)])
    assert code == 0, err
    return SimpleNamespace(run=base / "run", out=out, err=err)


# ---- stdout and stderr ---------------------------------------------------------------------------------


def test_fit_prints_only_its_results_on_stdout_and_the_progress_bar_on_stderr(fitted):
    _result_lines(fitted.out, fitted.run)
    assert "Epoch 0" in fitted.err and "\r" in fitted.err


@pytest.mark.parametrize("where", ["before", "after"])
def test_quiet_before_or_after_the_command_leaves_only_warnings_on_stderr(make_config, tmp_path, where):
    config = _write(_config(make_config, tmp_path / "run"), tmp_path / "config.yaml")
    args = ["-q", "fit", str(config)] if where == "before" else ["fit", str(config), "-q"]
    heard = _Heard()  # what Lightning's loggers let through, whichever handler would print it
    for name in ("pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).addHandler(heard)
    try:
        code, out, err = run_cli(args)
    finally:
        for name in ("pytorch_lightning", "lightning_fabric"):
            logging.getLogger(name).removeHandler(heard)
    assert code == 0, err
    _result_lines(out, tmp_path / "run")
    lines = [line for line in err.splitlines() if line.strip()]
    assert all(line.startswith("WARNING ") for line in lines), err  # no bar, no banner, no tip
    assert all(record.levelno >= logging.WARNING for record in heard.records), [r.msg for r in heard.records]
    assert logging.getLogger("pytorch_lightning").level == logging.INFO  # as Lightning set it, again


class _Heard(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_quiet_and_verbose_are_parsed_before_and_after_the_command():
    parser = _parser()
    assert parser.parse_args(["check", "c.yaml"]).quiet is False
    assert parser.parse_args(["check", "c.yaml", "-q"]).quiet is True
    assert parser.parse_args(["--quiet", "check", "c.yaml"]).quiet is True
    assert parser.parse_args(["check", "c.yaml", "--verbose"]).verbose is True
    assert parser.parse_args(["convert", "ali-ccp", "raw", "out", "-q"]).quiet is True


def test_quiet_and_verbose_together_are_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["-q", "check", "c.yaml", "-v"])
    assert exc.value.code == 2 and "contradict" in capsys.readouterr().err


# ---- help and version ----------------------------------------------------------------------------------


def _parsers(parser: argparse.ArgumentParser, name: str = "funnel"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def test_every_option_of_every_command_has_help():
    missing = [
        f"{name}: {action.dest}"
        for name, parser in _parsers(_parser())
        for action in parser._actions
        if not (action.help or "").strip() and not isinstance(action, argparse._SubParsersAction)
    ]
    assert not missing
    assert len(list(_parsers(_parser()))) >= 13  # every command and both convert formats


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["predict", "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    assert "(default: 4096)" in out and "(default: 262144)" in out
    assert "(default: None)" not in out and "(default: False)" not in out


def test_version_prints_the_package_version_and_exits_0(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"funnel {funnel.__version__}"


# ---- trainer.logger ------------------------------------------------------------------------------------


def _cfg(make_config, tmp_path, logger):
    raw = make_config(tmp_path / "run")
    raw["trainer"]["logger"] = logger
    return config_from_dict(raw)


@pytest.mark.parametrize(
    ("given", "names"),
    [
        (True, ("csv",)),
        (False, ("csv",)),
        ("tensorboard", ("csv", "tensorboard")),
        (["mlflow", "csv"], ("csv", "mlflow")),
    ],
)
def test_the_csv_log_is_always_written_first(make_config, tmp_path, given, names):
    assert loggers.logger_names(_cfg(make_config, tmp_path, given)) == names


def test_an_unknown_logger_exits_2_with_a_suggestion(base_config, write_config, capsys):
    base_config["trainer"]["logger"] = ["csv", "tensorbord"]
    assert main(["check", str(write_config(base_config))]) == 2
    err = capsys.readouterr().err
    assert "trainer.logger: unknown logger 'tensorbord'" in err and 'Did you mean "tensorboard"?' in err


@pytest.mark.parametrize("name", ["tensorboard", "mlflow"])
def test_a_missing_logger_package_exits_2_naming_the_install_before_any_run(
    base_config, write_config, tmp_path, capsys, monkeypatch, name
):
    monkeypatch.setattr(loggers, "_installed", lambda module: False)
    assert main(["fit", str(write_config(base_config)), f"trainer.logger={name}"]) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and f"pip install 'funnel[{name}]'" in err
    assert not (tmp_path / "run").exists()


MADE: list[dict] = []  # the fake loggers made, with their constructor's arguments


def _fake_logger(kind: str):
    from pytorch_lightning.loggers import Logger

    class Fake(Logger):
        def __init__(self, *args, **kwargs):
            super().__init__()
            self.metrics: list[dict] = []
            MADE.append({"kind": kind, "args": args, "kwargs": kwargs, "logger": self})

        name = property(lambda self: kind)
        version = property(lambda self: "")

        def log_hyperparams(self, params, *args, **kwargs):
            pass

        def log_metrics(self, metrics, step=None):
            self.metrics.append(metrics)

    return Fake


def test_tensorboard_is_lightnings_logger_beside_the_csv_log(make_config, tmp_path, monkeypatch):
    import pytorch_lightning.loggers as pl_loggers

    MADE.clear()
    monkeypatch.setattr(loggers, "_installed", lambda module: True)
    monkeypatch.setattr(pl_loggers, "TensorBoardLogger", _fake_logger("tensorboard"))
    config = _write(_config(make_config, tmp_path / "run", logger="tensorboard"), tmp_path / "config.yaml")
    code, out, err = run_cli(["-q", "fit", str(config)])
    assert code == 0, err
    (made,) = MADE
    assert made["args"][0] == tmp_path / "run" / "logs" and made["kwargs"]["name"] == "tensorboard"
    assert any("val/auc/conversion" in m for m in made["logger"].metrics)
    assert (tmp_path / "run" / "logs" / "metrics.csv").is_file()  # the CSV log all the same


def test_mlflow_tracks_into_the_run_directory_unless_told_otherwise(make_config, tmp_path, monkeypatch):
    import pytorch_lightning.loggers as pl_loggers

    MADE.clear()
    monkeypatch.setattr(pl_loggers, "MLFlowLogger", _fake_logger("mlflow"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = _cfg(make_config, tmp_path, "mlflow")
    csv, mlflow = loggers.build_loggers(cfg, tmp_path / "run")
    assert Path(csv.log_dir) == tmp_path / "run" / "logs"
    assert MADE[0]["kwargs"]["tracking_uri"] == f"file:{(tmp_path / 'run' / 'logs' / 'mlruns').resolve()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    loggers.build_loggers(cfg, tmp_path / "run")
    assert MADE[1]["kwargs"]["tracking_uri"] == "http://tracking:5000"


def test_tensorboard_writes_an_events_file(make_config, tmp_path):
    if not any(loggers._installed(m) for m in loggers.NEEDS["tensorboard"]):
        pytest.skip("needs funnel[tensorboard]")
    config = _write(_config(make_config, tmp_path / "run", logger=["csv", "tensorboard"]), tmp_path / "config.yaml")
    code, _, err = run_cli(["-q", "fit", str(config)])
    assert code == 0, err
    assert list((tmp_path / "run" / "logs" / "tensorboard").glob("events.out.tfevents.*"))


# ---- one copy of the best checkpoint -------------------------------------------------------------------


def test_a_run_keeps_one_copy_of_the_best_checkpoint_and_last_ckpt(fitted):
    names = sorted(p.name for p in (fitted.run / "checkpoints").iterdir())
    assert names == ["best.ckpt", "last.ckpt"]
    # one epoch: the best is the last; best.ckpt holds its weights alone, last.ckpt what --resume needs
    best = torch.load(fitted.run / BEST, weights_only=True)
    last = torch.load(fitted.run / LAST, weights_only=True)
    assert "optimizer_states" not in best and "optimizer_states" in last
    assert best["global_step"] == last["global_step"]


def _ckpt(path: Path, step: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": step // 10, "global_step": step, "state_dict": {}}, path)
    return path


def test_the_best_epoch_is_renamed_and_an_older_last_ckpt_kept_apart(tmp_path):
    best = _ckpt(tmp_path / "checkpoints" / "epoch0.ckpt", 10)
    _ckpt(tmp_path / LAST, 20)
    fit_module._keep_one_best(best, tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert torch.load(tmp_path / BEST, weights_only=True)["global_step"] == 10
    assert torch.load(tmp_path / LAST, weights_only=True)["global_step"] == 20


def test_without_a_monitored_checkpoint_best_is_the_weights_of_last(tmp_path):
    _ckpt(tmp_path / LAST, 20)
    fit_module._keep_one_best(tmp_path / LAST, tmp_path)
    assert torch.load(tmp_path / BEST, weights_only=True) == {"epoch": 2, "global_step": 20, "state_dict": {}}
    assert (tmp_path / LAST).is_file()
