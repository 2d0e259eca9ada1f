"""`funnel tune`: the tune: block, the pruning callback and whole studies through the CLI."""

from __future__ import annotations

import csv
import dataclasses
import json
import sys
from pathlib import Path

import pytest
import yaml

from funnel.cli import main
from funnel.errors import ConfigError
from funnel.runs import config_to_raw, load_config_of_run, read_manifest
from funnel.spec import config_from_dict, load_config
from funnel.spec.tune_spec import ParamSpec

optuna = pytest.importorskip("optuna")

ROOT = Path(__file__).resolve().parents[1]
SPACE = {"optim.lr": {"log_uniform": [1.0e-3, 3.0e-2]}, "funnel.tower.hidden": {"choice": [[8], [16, 8]]}}


def with_tune(config: dict, tune: object) -> dict:
    return {**config, "tune": tune}


def trial_rows(out: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((out / "trials.csv").read_text().splitlines()))


@pytest.mark.parametrize(
    ("space", "expected"),
    [
        ({"uniform": [0.0, 0.5]}, ParamSpec("optim.weight_decay", "uniform", low=0.0, high=0.5)),
        ({"log_uniform": ["1e-5", 1.0e-2]}, ParamSpec("optim.weight_decay", "log_uniform", low=1e-5, high=1e-2)),
        ({"int": [1, 4]}, ParamSpec("optim.weight_decay", "int", low=1.0, high=4.0)),
        ({"log_int": [2, 64]}, ParamSpec("optim.weight_decay", "log_int", low=2.0, high=64.0)),
        (
            {"choice": [[128, 64], {"a": 1}, 0.5]},
            ParamSpec("optim.weight_decay", "choice", choices=("[128, 64]", "{a: 1}", "0.5")),
        ),
    ],
    ids=["uniform", "log_uniform", "int", "log_int", "choice"],
)
def test_each_kind_of_space_parses_into_a_param(base_config, space, expected):
    cfg = config_from_dict(with_tune(base_config, {"optim.weight_decay": space}))
    assert cfg.tune.params == (expected,)


def test_nested_keys_are_the_dotted_keys_and_survive_the_run_directory_round_trip(base_config):
    flat = config_from_dict(with_tune(base_config, SPACE))
    nested = config_from_dict(
        with_tune(
            base_config,
            {"optim": {"lr": SPACE["optim.lr"]}, "funnel": {"tower": {"hidden": SPACE["funnel.tower.hidden"]}}},
        )
    )
    assert flat.tune == nested.tune and flat.tune.keys == ["optim.lr", "funnel.tower.hidden"]
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(config_to_raw(flat)))) == flat


@pytest.mark.parametrize(
    ("tune", "message"),
    [
        ({"optim.lrr": {"uniform": [0.1, 1]}}, "tune.optim.lrr: optim has no key 'lrr'. Did you mean \"lr\"?"),
        ({"optim.lr": {"unifrom": [0.1, 1]}}, "'unifrom' is not a kind of search space. Did you mean \"uniform\"?"),
        ({"optim.lr": {"uniform": [1, 0.1]}}, "tune.optim.lr.uniform: low must be below high"),
        ({"optim.lr": {"log_uniform": [0, 1]}}, "a log scale needs low > 0"),
        ({"funnel.embed_dim": {"int": [1.5, 4]}}, "expected [low, high], two integers"),
        ({"funnel.embed_dim": {"choice": []}}, "expected a non-empty list"),
        ({"funnel.embed_dim": 8}, "expected one search space such as"),
        ({"run_dir": {"choice": ["a", "b"]}}, "run_dir cannot be tuned"),
        ({"funnel.loss_weighting": {"choice": [1]}}, "is a section; search one of its keys"),
        ({"optim.lr.x": {"choice": [1]}}, "optim.lr is a single value"),
        ({}, "tune: expected a mapping of config keys"),
    ],
)
def test_a_bad_tune_block_is_rejected_naming_the_key(base_config, tune, message):
    with pytest.raises(ConfigError) as exc:
        config_from_dict(with_tune(base_config, tune))
    assert message in str(exc.value)


def test_the_shipped_tune_config_is_esmm_yaml_plus_its_tune_block():
    tuned, _ = load_config(ROOT / "configs" / "esmm_tune.yaml")
    plain, _ = load_config(ROOT / "configs" / "esmm.yaml")
    assert tuned.tune is not None and dataclasses.replace(tuned, tune=None) == plain


class FakeTrial:
    """An Optuna trial whose pruner says "prune" at the first report."""

    def __init__(self):
        self.reported: list[tuple[float, int]] = []

    def report(self, value: float, step: int) -> None:
        self.reported.append((value, step))

    def should_prune(self) -> bool:
        return True


def test_the_pruning_callback_stops_the_run_cleanly_after_the_validation_it_prunes(base_config, tmp_path):
    from funnel.training.fit import extra_callbacks, fit_config
    from funnel.tune import OptunaPruning

    base_config["trainer"] |= {"max_epochs": 3, "monitor": "val/auc/conversion"}  # as tune sets it
    trial = FakeTrial()
    pruning = OptunaPruning(trial)
    with extra_callbacks(pruning):
        run_dir = fit_config(config_from_dict(base_config))
    assert pruning.pruned and len(trial.reported) == 1 and trial.reported[0][1] == 0
    assert pruning.monitor == "val/auc/conversion" and pruning.best == trial.reported[0][0]
    manifest = read_manifest(run_dir)
    assert manifest["status"] == "complete" and manifest["epochs_done"] == 1
    assert (run_dir / "metrics.json").is_file()


class PruneAfterTheFirst(optuna.pruners.BasePruner):
    def prune(self, study, trial) -> bool:
        return trial.number >= 1


def test_a_three_trial_study_writes_runs_a_summary_and_a_best_yaml_that_fit_reproduces(
    base_config, write_config, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(optuna.pruners, "MedianPruner", PruneAfterTheFirst)  # trials 1 and 2 are pruned
    base_config["trainer"]["max_epochs"] = 2
    path = write_config(with_tune(base_config, SPACE))
    out = tmp_path / "study"
    assert main(["tune", str(path), "--trials", "3", "--seed", "1", "--out", str(out), "--report"]) == 0
    printed = capsys.readouterr()
    assert printed.err.count("trial ") >= 3 and "trial 3/3 pruned" in printed.err
    assert "| trial | optim.lr | funnel.tower.hidden | value | state | epochs | seconds |" in printed.out
    rows = trial_rows(out)
    assert [r["state"] for r in rows] == ["complete", "pruned", "pruned"]
    assert [r["epochs"] for r in rows] == ["2", "1", "1"]
    for k, row in enumerate(rows):  # every trial is an ordinary run directory
        assert Path(row["run_dir"]) == out / f"trial-{k:03d}" and (out / f"trial-{k:03d}" / "metrics.json").is_file()
    assert read_manifest(out / "trial-001")["tune"]["state"] == "pruned"
    study = json.loads((out / "study.json").read_text())
    assert study["best"]["number"] == 0 and study["best"]["value"] == pytest.approx(float(rows[0]["value"]))
    best, _ = load_config(out / "best.yaml")
    trial = load_config_of_run(out / "trial-000")
    assert best == dataclasses.replace(trial, run_dir=None)
    assert best.optim.lr == float(rows[0]["optim.lr"]) and best.seed == 0 and best.tune is None
    # --report: the study (objective by trial, every trial) above its best trials' runs, best first
    page = (out / "report.html").read_text()
    study_part = page[page.index('<section id="study">') : page.index("</section>")]
    assert "<h1>funnel tune report</h1>" in page and "val/auc/conversion" in study_part
    assert study_part.count("<tr>") == 1 + 3  # the header and one row per trial
    order = sorted(rows, key=lambda r: (r["state"] != "complete", -float(r["value"])))  # as the study ranks
    names = [f"trial {r['trial']}" + (" (best)" if k == 0 else "") for k, r in enumerate(order)]
    at = [page.index(f"<b>{n}</b>") for n in names]
    assert at == sorted(at) and names[0] == "trial 0 (best)"


def test_ctrl_c_ends_the_study_with_what_completed(base_config, write_config, tmp_path, capsys, monkeypatch):
    import funnel.training.fit as fit_module

    real, calls = fit_module.fit_config, []

    def interrupted_second(cfg, path):
        calls.append(cfg)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(cfg, path)

    monkeypatch.setattr(fit_module, "fit_config", interrupted_second)
    out = tmp_path / "study"
    code = main(["tune", str(write_config(with_tune(base_config, SPACE))), "--trials", "5", "--out", str(out)])
    assert code == 130 and "interrupted" in capsys.readouterr().err
    assert [r["state"] for r in trial_rows(out)] == ["complete", "interrupted"]
    assert (out / "best.yaml").is_file()


def test_timeout_starts_no_trial_after_the_time_is_up(base_config, write_config, tmp_path, capsys):
    out = tmp_path / "study"
    path = write_config(with_tune(base_config, SPACE))
    assert main(["tune", str(path), "--trials", "3", "--timeout", "1e-6", "--out", str(out)]) == 0
    assert "--timeout 1e-06 s reached after 1 trial(s)" in capsys.readouterr().err
    assert len(trial_rows(out)) == 1


def test_values_the_config_rejects_exit_2_before_any_trial(base_config, write_config, tmp_path, capsys):
    out = tmp_path / "study"
    path = write_config(with_tune(base_config, {"optim.name": {"choice": ["adam", "adamm"]}}))
    assert main(["tune", str(path), "--trials", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: tune.optim.name: with optim.name=adamm: optim.name:") and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("tune", "args", "message"),
    [
        (None, [], "no `tune:` block"),
        (SPACE, ["--trials", "0"], "--trials must be >= 1"),
        (SPACE, ["--timeout", "0"], "--timeout must be a positive number"),
        ({"optim.lrr": {"uniform": [0.1, 1]}}, [], 'Did you mean "lr"?'),
    ],
)
def test_a_bad_study_exits_2_with_an_error_line(base_config, write_config, tmp_path, capsys, tune, args, message):
    config = base_config if tune is None else with_tune(base_config, tune)
    assert main(["tune", str(write_config(config)), *args, "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_without_optuna_tune_says_how_to_install_it(base_config, write_config, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` raises ImportError
    assert main(["tune", str(write_config(with_tune(base_config, SPACE)))]) == 2
    assert "pip install 'funnel[tune]'" in capsys.readouterr().err
