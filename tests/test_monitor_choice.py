"""The default monitor gives way to val/auc_mean (the mean of the stages' path AUCs) when its AUC
rests on too few labels of the valid split."""

from __future__ import annotations

import json
import logging
import math

import pandas as pd
import pytest
import torch

from funnel.cli import main
from funnel.data.degenerate import monitor_minority
from funnel.data.table import EncodedTable
from funnel.graph import FunnelGraph
from funnel.spec import config_from_dict
from funnel.training.fit import fit
from funnel.training.module import stage_auc_mean
from funnel.training.monitor import MIN_LABELS, choose_monitor

MINIMAL = {
    "data": {"train": "train.csv"},
    "features": [{"name": "user_id", "kind": "categorical"}],
    "funnel": {"stages": [{"name": "click"}, {"name": "conversion", "after": "click"}]},
}


def table(clicks: int, conversions: int, rows: int) -> EncodedTable:
    """``rows`` rows: the first ``clicks`` clicked, the first ``conversions`` of them converted."""
    y = torch.zeros(rows, 2)
    y[:clicks, 0] = 1
    y[:conversions, 1] = 1
    return EncodedTable(cat=torch.zeros((rows, 0), dtype=torch.int64), num=torch.zeros((rows, 0)), labels=y)


def graph() -> FunnelGraph:
    return FunnelGraph.chain([("click", "click", None), ("conversion", "conversion", "click")])


def config(**trainer):
    return config_from_dict({**MINIMAL, "trainer": trainer})


def test_the_rarer_class_of_each_auc_space_is_counted():
    t = table(clicks=30, conversions=4, rows=100)
    assert monitor_minority(t, graph(), "val/auc/conversion") == (4, "positives")  # over all 100 rows
    assert monitor_minority(t, graph(), "val/auc_cond/conversion") == (4, "positives")  # over the 30 clicks
    assert monitor_minority(t, graph(), "val/auc_cond/click") == (30, "positives")
    assert monitor_minority(table(clicks=90, conversions=88, rows=100), graph(), "val/auc_cond/conversion") == (
        2,
        "negatives",
    )
    assert monitor_minority(t, graph(), "val/loss") is None


def test_a_default_monitor_over_few_positives_becomes_the_mean_stage_auc_with_a_reason(caplog):
    caplog.set_level(logging.INFO, logger="funnel.training.monitor")
    assert choose_monitor(config(), graph(), table(3000, 57, 20_000)) == ("val/auc_mean", "max")
    [msg] = [r.getMessage() for r in caplog.records]
    assert "default monitor val/auc/conversion would rank epochs by 57 positives" in msg
    assert f"fewer than {MIN_LABELS}" in msg and "Set trainer.monitor" in msg


def test_enough_labels_keep_the_default_and_a_named_monitor_is_always_kept(caplog):
    caplog.set_level(logging.INFO, logger="funnel.training.monitor")
    enough = table(5000, MIN_LABELS, 20_000)
    assert choose_monitor(config(), graph(), enough) == ("val/auc/conversion", "max")
    few = table(3000, 57, 20_000)
    assert choose_monitor(config(monitor="val/auc/conversion"), graph(), few) == ("val/auc/conversion", "max")
    assert choose_monitor(config(monitor="val/auc/click"), graph(), few) == ("val/auc/click", "max")
    assert caplog.records == []


def test_check_shows_the_monitor_fit_will_use(base_config, write_config, capsys):
    base_config["trainer"].pop("monitor", None)  # the tiny data has a few dozen conversions
    assert main(["check", str(write_config(base_config))]) == 0
    out = capsys.readouterr().out
    report = json.loads(out[: out.rindex("}") + 1])
    assert (report["monitor"]["metric"], report["monitor"]["mode"]) == ("val/auc_mean", "max")
    assert "default monitor val/auc/conversion would rank epochs by" in report["monitor"]["why"]
    assert "warnings" not in report and out.rstrip().endswith("config and data OK")


def test_the_mean_stage_auc_skips_undefined_stages():
    values = {"auc/click": 0.7, "auc/conversion": 0.8, "auc_cond/conversion": 0.1, "loss": 3.0}
    assert stage_auc_mean(values, ["click", "conversion"]) == pytest.approx(0.75)
    assert stage_auc_mean({"auc/click": 0.7, "auc/conversion": math.nan}, ["click", "conversion"]) == 0.7
    assert math.isnan(stage_auc_mean({}, ["click"]))


def test_a_fit_over_few_conversions_logs_and_keeps_its_best_epoch_by_the_mean(base_config, write_config):
    base_config["trainer"] |= {"max_epochs": 2}
    base_config["trainer"].pop("monitor", None)
    run = fit(write_config(base_config))
    assert json.loads((run / "run.json").read_text())["monitor"] == "val/auc_mean"
    logged = pd.read_csv(run / "logs" / "metrics.csv").dropna(subset=["val/auc_mean"])
    means = (logged["val/auc/click"] + logged["val/auc/conversion"]) / 2
    assert logged["val/auc_mean"].tolist() == pytest.approx(means.tolist(), abs=1e-6)
