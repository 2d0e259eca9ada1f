"""Tests for funnel.training.metrics: every metric on the space where it is defined."""

from __future__ import annotations

import json
import math
import pickle
import warnings
from pathlib import Path

import pytest
import torch

from funnel.graph import FunnelGraph
from funnel.training.metrics import FunnelMetrics, WeightedMean

GRAPH = FunnelGraph.chain([("click", "click", None), ("conversion", "conversion", "click")])

# 8 impressions: 4 clicked, 2 of them converted (no label conflicts).
Y_CLICK = [1, 1, 1, 1, 0, 0, 0, 0]
Y_CONV = [1, 1, 0, 0, 0, 0, 0, 0]
P_CTR = [0.9, 0.8, 0.3, 0.5, 0.6, 0.2, 0.1, 0.4]
P_CVR = [0.5, 0.2, 0.4, 0.1, 0.9, 0.7, 0.3, 0.05]  # high on unclicked rows: the all-rows AUC is worse
P_CTCVR = [a * b for a, b in zip(P_CTR, P_CVR, strict=True)]


def auc(scores: list[float], labels: list[int]) -> float:
    """Share of (positive, negative) pairs ranked correctly, ties counting one half."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y == 1]
    neg = [s for s, y in zip(scores, labels, strict=True) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def bce(p: float, y: int) -> float:
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def update(metrics: FunnelMetrics, rows=slice(None), y_click=Y_CLICK, y_conv=Y_CONV, truth=None) -> None:
    reach = torch.tensor([P_CTR, P_CTCVR], dtype=torch.float64).T[rows]
    cond = torch.tensor([P_CTR, P_CVR], dtype=torch.float64).T[rows]
    labels = torch.tensor([y_click, y_conv], dtype=torch.float32).T[rows]
    metrics.update(reach.log(), cond.log(), labels, truth or {})


def computed(**kwargs) -> dict[str, float]:
    metrics = FunnelMetrics(GRAPH)
    update(metrics, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return metrics.compute()


def test_metric_keys_are_named_by_kind_and_stage():
    assert set(computed()) == {
        f"{m}/{s}" for m in ("auc", "auc_cond", "logloss", "calib") for s in ("click", "conversion")
    }


def test_conditional_auc_uses_only_rows_whose_parent_happened():
    clicked = [i for i, y in enumerate(Y_CLICK) if y == 1]
    on_clicked = auc([P_CVR[i] for i in clicked], [Y_CONV[i] for i in clicked])  # 3 of 4 pairs
    assert on_clicked == 0.75 and auc(P_CVR, Y_CONV) == 0.5  # the same scores on all rows: 0.5
    assert computed()["auc_cond/conversion"] == pytest.approx(on_clicked)


def test_path_auc_uses_all_rows():
    values = computed()
    assert values["auc/conversion"] == pytest.approx(auc(P_CTCVR, Y_CONV))
    assert values["auc/click"] == pytest.approx(auc(P_CTR, Y_CLICK))
    assert values["auc/conversion"] != pytest.approx(values["auc_cond/conversion"])


def test_first_stage_conditional_space_is_all_rows():
    values = computed()
    assert values["auc_cond/click"] == pytest.approx(values["auc/click"])


def test_calibration_is_mean_prediction_over_mean_label():
    values = computed()
    assert values["calib/click"] == pytest.approx((sum(P_CTR) / 8) / (sum(Y_CLICK) / 8))  # 3.8 / 4
    assert values["calib/click"] == pytest.approx(0.95)
    assert values["calib/conversion"] == pytest.approx(sum(P_CTCVR) / sum(Y_CONV))


def test_logloss_is_the_mean_bce_of_the_path_probability():
    values = computed()
    assert values["logloss/click"] == pytest.approx(sum(map(bce, P_CTR, Y_CLICK)) / 8, rel=1e-6)
    assert values["logloss/conversion"] == pytest.approx(sum(map(bce, P_CTCVR, Y_CONV)) / 8, rel=1e-6)


def test_batches_accumulate_to_the_whole_epoch():
    metrics = FunnelMetrics(GRAPH)
    update(metrics, rows=slice(0, 3))
    update(metrics, rows=slice(3, 8))
    whole = computed()
    for key, value in metrics.compute().items():
        assert value == pytest.approx(whole[key], rel=1e-6), key


def test_space_with_one_class_gives_nan_without_warning():
    values = computed(y_conv=[0] * 8)  # no conversions at all
    assert math.isnan(values["auc/conversion"]) and math.isnan(values["auc_cond/conversion"])
    assert math.isnan(values["calib/conversion"])  # 0 positives: the ratio is undefined
    assert values["auc/click"] == pytest.approx(auc(P_CTR, Y_CLICK))


def test_conditional_space_with_one_class_is_nan_while_path_auc_is_defined():
    values = computed(y_conv=[1, 1, 1, 1, 0, 0, 0, 0])  # every click converts
    assert math.isnan(values["auc_cond/conversion"])
    assert values["auc/conversion"] == pytest.approx(auc(P_CTCVR, [1, 1, 1, 1, 0, 0, 0, 0]))


def test_empty_conditional_space_is_nan():
    values = computed(y_click=[0] * 8, y_conv=[0] * 8)
    assert math.isnan(values["auc_cond/conversion"]) and math.isnan(values["auc/click"])
    assert values["logloss/click"] == pytest.approx(sum(bce(p, 0) for p in P_CTR) / 8, rel=1e-6)


def test_reset_forgets_earlier_batches():
    metrics = FunnelMetrics(GRAPH)
    update(metrics, y_conv=[0] * 8)
    metrics.reset()
    update(metrics)
    assert metrics.compute()["auc_cond/conversion"] == pytest.approx(0.75)


def test_ground_truth_metrics_score_true_probabilities():
    true_cond = torch.tensor([[0.5, 0.6]] * 8, dtype=torch.float32)
    true_cond[:, 0] = torch.tensor([0.9, 0.1, 0.8, 0.7, 0.2, 0.3, 0.6, 0.4])
    true_reach = true_cond.clone()
    true_reach[:, 1] = true_cond[:, 0] * true_cond[:, 1]
    cf = torch.tensor([[1, 1]] * 4 + [[0, 0]] * 4, dtype=torch.float32)
    metrics = FunnelMetrics(GRAPH, with_truth=True)
    update(metrics, truth={"true_cond": true_cond, "true_reach": true_reach, "cf": cf})
    values = metrics.compute()
    assert values["oracle_auc/click"] == pytest.approx(auc(true_cond[:, 0].tolist(), Y_CLICK))
    # entire-space pCVR AUC: predicted conditional vs the counterfactual draw, all rows
    assert values["auc_cond_es/conversion"] == pytest.approx(auc(P_CVR, [1, 1, 1, 1, 0, 0, 0, 0]))
    assert values["calib_cond_es/conversion"] == pytest.approx(sum(P_CVR) / (0.6 * 8), rel=1e-6)
    assert values["mae_cond_es/conversion"] == pytest.approx(sum(abs(p - 0.6) for p in P_CVR) / 8, rel=1e-5)


# ---- across processes ----------------------------------------------------------------------------------
# Rank 0 holds 3 rows, rank 1 the other 5: rank 0 has clicks but no conversion, so on its own the
# conversion AUCs are undefined; over the whole split they are not.
SHARDS = ([2, 3, 4], [0, 1, 5, 6, 7])
LOSSES = ([1.0], [2.0, 2.0])  # per-batch mean losses, batches of 3 rows on rank 0, 2 and 3 on rank 1
WEIGHTS = ([3], [2, 3])


def _synchronised(rank: int, init: str, out: str) -> None:
    """One of two gloo processes: update with this rank's shard, compute, write the result."""
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        local = FunnelMetrics(GRAPH, sync_on_compute=False)
        update(local, rows=SHARDS[rank])
        metrics = FunnelMetrics(GRAPH)
        update(metrics, rows=SHARDS[rank])
        loss = WeightedMean()
        for value, weight in zip(LOSSES[rank], WEIGHTS[rank], strict=True):
            loss.update(torch.tensor(value), weight)
        result = {"local": local.compute(), "whole": metrics.compute(), "loss": float(loss.compute())}
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        torch.distributed.destroy_process_group()


def test_metrics_of_two_processes_are_those_of_the_whole_split(tmp_path):
    torch.multiprocessing.start_processes(
        _synchronised, args=(f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=2, start_method="spawn"
    )
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    whole = computed()
    assert math.isnan(results[0]["local"]["auc/conversion"])  # rank 0 alone: no conversion
    for result in results:  # every rank: the same values, those of one process over all 8 rows
        for key, value in whole.items():
            assert result["whole"][key] == pytest.approx(value, rel=1e-6), key
        # rows weigh: (1 * 3 + 2 * 2 + 2 * 3) / 8, not the mean of the ranks' means (1.5)
        assert result["loss"] == pytest.approx(13 / 8)


def test_metrics_pickle_for_ddp_spawn():
    pickle.dumps(FunnelMetrics(GRAPH, with_truth=True, free=("click",)))  # every kind of view
    again = pickle.loads(pickle.dumps(FunnelMetrics(GRAPH)))
    update(again)
    assert again.compute()["auc_cond/conversion"] == pytest.approx(0.75)
