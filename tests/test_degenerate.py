"""Tests for funnel.data.degenerate: empty splits, one-class stages and undefined monitor metrics."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from funnel.cli import main
from funnel.data.degenerate import check_degenerate, degenerate_problems, monitor_undefined
from funnel.data.table import EncodedTable
from funnel.errors import DataError
from funnel.graph import FunnelGraph


def table(labels: list[list[int]], stages: int = 2) -> EncodedTable:
    """A table with no features and these (N, S) labels."""
    y = torch.tensor(labels, dtype=torch.float32).reshape(-1, stages)
    n = len(y)
    return EncodedTable(cat=torch.zeros((n, 0), dtype=torch.int64), num=torch.zeros((n, 0)), labels=y)


def chain() -> FunnelGraph:
    """click -> conversion, conversion read from the column "bought"."""
    return FunnelGraph.chain([("click", "click", None), ("conversion", "bought", "click")])


GOOD = [[1, 1], [1, 0], [0, 0], [0, 0]]  # both classes in both stages


# ---- check_degenerate ------------------------------------------------------------------------------------


def test_data_with_both_classes_in_every_stage_passes():
    tables = {"train": table(GOOD), "valid": table(GOOD), "test": table([])}  # an empty test split is no concern
    assert degenerate_problems(tables, chain()) == []
    assert check_degenerate(tables, chain()) is None


@pytest.mark.parametrize("split", ["train", "valid"])
def test_an_empty_split_is_a_data_error_naming_it(split):
    tables = {"train": table(GOOD), "valid": table(GOOD), split: table([])}
    with pytest.raises(DataError) as err:
        check_degenerate(tables, chain())
    assert err.value.problems == [err.value.problems[0]]  # empty train: no per-stage complaints on top
    msg = err.value.problems[0]
    assert msg.startswith(f"{split}: 0 rows") and "header-only" in msg
    assert f"Give data.{split} a file with data rows" in msg


def test_a_stage_without_positives_names_the_stage_column_and_counts():
    tables = {"train": table([[1, 0], [0, 0], [1, 0]]), "valid": table(GOOD)}
    with pytest.raises(DataError) as err:
        check_degenerate(tables, chain())
    [msg] = err.value.problems
    assert msg.startswith("train: stage 'conversion' (label column 'bought') has 0 positives and 3 negatives")
    assert "AUC is undefined and the loss cannot learn it" in msg
    assert "`positive:`" in msg and "remove the stage" in msg


def test_a_stage_without_negatives_is_refused_too():
    tables = {"train": table([[1, 1], [1, 0]]), "valid": table(GOOD)}
    [msg] = degenerate_problems(tables, chain())
    assert "stage 'click' (label column 'click') has 2 positives and 0 negatives" in msg


def test_every_problem_is_reported_at_once():
    tables = {"train": table([[0, 0], [0, 0]]), "valid": table([])}
    problems = degenerate_problems(tables, chain())
    assert [p.split(":")[0] for p in problems] == ["valid", "train", "train"]
    assert "stage 'click'" in problems[1] and "stage 'conversion'" in problems[2]


# ---- monitor_undefined ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "monitor",
    [
        "val/auc/click",
        "val/auc/conversion",
        "val/auc_cond/click",
        "val/auc_cond/conversion",
        "val/logloss/click",
        "val/calib/conversion",
        "val/loss",
    ],
)
def test_every_metric_is_defined_with_both_classes(monitor):
    assert monitor_undefined(table(GOOD), chain(), monitor) is None


def test_auc_counts_all_rows_and_auc_cond_the_rows_whose_parent_happened():
    # conversion: 1 positive in 3 rows (AUC defined), but every clicked row converted
    valid = table([[1, 1], [0, 0], [0, 0]])
    assert monitor_undefined(valid, chain(), "val/auc/conversion") is None
    assert (
        monitor_undefined(valid, chain(), "val/auc_cond/conversion")
        == "valid has 0 negatives of stage 'conversion' (1 rows with 'click' = 1)"
    )


def test_a_stage_without_positives_in_valid_is_undefined_on_every_auc():
    valid = table([[1, 0], [0, 0], [1, 0]])
    assert (
        monitor_undefined(valid, chain(), "val/auc/conversion")
        == "valid has 0 positives of stage 'conversion' (3 rows)"
    )
    assert (
        monitor_undefined(valid, chain(), "val/auc_cond/conversion")
        == "valid has 0 positives of stage 'conversion' (2 rows with 'click' = 1)"
    )
    for monitor in ("val/logloss/conversion", "val/calib/conversion", "val/loss"):
        assert monitor_undefined(valid, chain(), monitor) is None  # defined whenever there are rows


def test_auc_cond_of_a_first_stage_uses_all_rows():
    valid = table([[1, 0], [1, 1]])
    assert monitor_undefined(valid, chain(), "val/auc_cond/click") == "valid has 0 negatives of stage 'click' (2 rows)"


def test_an_empty_valid_table_leaves_no_metric_defined():
    for monitor in ("val/auc/click", "val/loss"):
        assert monitor_undefined(table([]), chain(), monitor) == "valid has 0 rows"


def test_auc_cond_of_a_branch_stage_uses_the_rows_of_its_after_stage():
    # ESM²: buy is reached via cart or not-cart, both after click; stage order click, cart, buy
    graph = FunnelGraph.build(
        [
            ("click", "click", None, None),
            ("cart", "cart", "click", None),
            ("buy", "buy", "click", "cart"),
        ]
    )
    assert graph.names == ["click", "cart", "buy"] and graph.stage("buy").after == "click"
    valid = table([[1, 1, 1], [1, 0, 1], [0, 0, 0], [0, 0, 0]], stages=3)
    assert monitor_undefined(valid, graph, "val/auc/buy") is None
    assert (
        monitor_undefined(valid, graph, "val/auc_cond/buy")
        == "valid has 0 negatives of stage 'buy' (2 rows with 'click' = 1)"
    )
    assert monitor_undefined(valid, graph, "val/auc_cond/cart") is None


# ---- end to end: funnel check ------------------------------------------------------------------------------


def user_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and ("\n" + err).count("\nerror: ") == 1, err
    return err


@pytest.mark.parametrize("split", ["train", "valid"])
def test_check_refuses_a_header_only_split(split, base_config, write_config, tmp_path, capsys):
    empty = tmp_path / f"{split}.csv"
    pd.read_csv(base_config["data"][split]).head(0).to_csv(empty, index=False)
    assert empty.read_text().count("\n") == 1  # the header alone
    base_config["data"][split] = str(empty)
    assert main(["check", str(write_config(base_config))]) == 2
    err = user_error(capsys)
    assert f"{split}: 0 rows (data.{split}: {str(empty)!r})" in err and "header-only" in err


def test_check_refuses_a_stage_whose_positive_values_match_nothing(base_config, write_config, capsys):
    base_config["funnel"]["stages"][1]["positive"] = ["7"]
    assert main(["check", str(write_config(base_config))]) == 2
    err = user_error(capsys)
    assert "train: stage 'conversion' (label column 'conversion') has 0 positives and 2400 negatives" in err


def test_check_counts_missing_and_non_finite_values_per_split(base_config, write_config, tmp_path, capsys):
    train = pd.read_csv(base_config["data"]["train"])
    train.loc[[0, 5, 9], "price"] = [np.inf, -np.inf, np.inf]  # price has transform log1p: -inf is non-finite too
    train.to_csv(tmp_path / "train.csv", index=False)
    base_config["data"]["train"] = str(tmp_path / "train.csv")
    assert main(["check", str(write_config(base_config))]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == "config and data OK"
    report = json.loads("\n".join(out[:-1]))
    assert report["numeric"]["train"]["nonfinite"] == {"price": 3}
    assert report["numeric"]["valid"]["nonfinite"] == {}
    missing = int(pd.read_csv(base_config["data"]["test"])["n_prev_visits"].isna().sum())
    assert missing > 0 and report["numeric"]["test"]["missing"] == {"n_prev_visits": missing}


def test_an_empty_held_out_valid_split_points_at_valid_split():
    from funnel.spec import config_from_dict

    cfg = config_from_dict(
        {
            "data": {"train": "t.csv", "valid_split": 0.1},
            "features": [{"name": "u", "kind": "categorical"}],
            "funnel": {"stages": [{"name": "click"}, {"name": "conversion", "after": "click"}]},
        }
    )
    [msg] = degenerate_problems({"train": table(GOOD), "valid": table([])}, chain(), cfg)
    assert msg == (
        "valid: 0 rows in the share data.valid_split = 0.1 held out of train; "
        "raise data.valid_split or give data.valid a file with data rows."
    )
