"""The fast paths of `funnel predict` give what the plain path gives: Linear+ReLU fused into one
oneDNN call (funnel/fusion.py), and the pipeline (parse and encode ahead in one thread, write
behind in another: prefetched + TableWriter(background=True))."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import funnel
from funnel import fusion
from funnel.data.io import TableWriter, read_table
from funnel.fusion import LinearReLU, fuse_linear_relu
from funnel.inference import dense_layers_to_bf16, predict_run, predict_table
from funnel.runs import load_run


@pytest.fixture(scope="module")
def run(make_config, tmp_path_factory) -> funnel.Run:
    """The tiny CSV funnel with towers [16, 8]: two Linear+ReLU pairs per tower."""
    cfg = make_config(tmp_path_factory.mktemp("fast") / "run")
    cfg["funnel"]["tower"]["hidden"] = [16, 8]
    return funnel.fit(cfg)


@pytest.fixture(scope="module")
def scored(run, synth_dir):
    """(the run's model, the encoded test split, the plain float32 predictions)."""
    _, _, featurizer, model = load_run(run.path)
    table = featurizer.encode(pd.read_csv(synth_dir / "test.csv"), "test", labels=False)
    return model, table, predict_table(model, table, 64)


def pairs(model: nn.Module) -> int:
    return sum(isinstance(m, LinearReLU) for m in model.modules())


def test_every_linear_relu_pair_of_the_towers_is_fused_and_the_heads_are_not(scored):
    model = copy.deepcopy(scored[0])
    assert fuse_linear_relu(model) == 4 == pairs(model)  # 2 towers x 2 hidden layers
    assert all(type(h) is nn.Linear for h in model.net.heads.values())
    assert fuse_linear_relu(model) == 0  # nothing left to fuse


def test_fused_float32_predictions_match_the_plain_path_to_1e_6(scored):
    model, table, exact = scored
    fused = copy.deepcopy(model)
    fuse_linear_relu(fused)
    got = predict_table(fused, table, 64)
    assert list(got.columns) == list(exact.columns) and len(got) == len(exact) == 300
    np.testing.assert_allclose(got.to_numpy(), exact.to_numpy(), rtol=0, atol=1e-6)


def test_fused_bf16_predictions_stay_within_the_bf16_tolerance(scored):
    model, table, exact = scored
    plain = dense_layers_to_bf16(copy.deepcopy(model))
    fused = copy.deepcopy(plain)
    assert fuse_linear_relu(fused) == 4
    got, ref = predict_table(fused, table, 64, bf16=True), predict_table(plain, table, 64, bf16=True)
    assert (got - exact).abs().max().max() < 0.02  # the tolerance of every bf16 scoring test
    assert (got - ref).abs().max().max() < 0.01


def test_linear_relu_gives_relu_of_linear_also_on_3d_inputs():
    torch.manual_seed(0)
    linear = nn.Linear(6, 5)
    fused = LinearReLU(linear)
    with torch.inference_mode():
        for x in (torch.randn(7, 6), torch.randn(2, 3, 6), torch.randn(6, 7).t()):  # 2-D, 3-D, strided
            torch.testing.assert_close(fused(x), F.relu(linear(x)), rtol=0, atol=1e-6)


def test_a_sequence_with_batch_norm_between_is_left_alone():
    seq = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 2), nn.GELU())
    assert fuse_linear_relu(seq) == 0
    assert [type(m) for m in seq] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.GELU]


def test_without_a_working_kernel_the_model_keeps_its_eager_layers(scored, monkeypatch):
    def broken(*args):
        raise RuntimeError("no oneDNN kernel in this build")

    monkeypatch.setattr(fusion, "_fused", broken)
    fusion.fusion_works.cache_clear()
    try:
        model = copy.deepcopy(scored[0])
        assert fuse_linear_relu(model) == 0 and pairs(model) == 0
    finally:
        fusion.fusion_works.cache_clear()  # the next test sees the real kernel again


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_the_pipeline_writes_every_chunk_in_order_with_the_plain_values(run, synth_dir, scored, tmp_path, suffix):
    """The 300 rows as 6 chunks of 50 through the pipeline, with --keep: the plain values, in order."""
    out = tmp_path / f"p{suffix}"
    predict_run(run.path, synth_dir / "test.csv", out, keep=["user_id", "hour"], chunk_rows=50, batch_size=16)
    got = read_table(out)
    source = pd.read_csv(synth_dir / "test.csv")
    exact = scored[2]
    assert list(got.columns) == ["user_id", "hour", *exact.columns]
    assert got["user_id"].tolist() == source["user_id"].tolist() and got["hour"].tolist() == source["hour"].tolist()
    np.testing.assert_allclose(got[list(exact.columns)].to_numpy(), exact.to_numpy(), rtol=0, atol=1e-6)


def test_a_failed_background_write_is_raised_and_keeps_the_earlier_file(tmp_path):
    out = tmp_path / "p.parquet"
    out.write_bytes(b"complete earlier predictions")
    bad = pd.DataFrame({"p": [0.5, "not a float"]})  # arrow cannot type a mixed column
    with pytest.raises(pa.ArrowException, match="not a float"), TableWriter(out, background=True) as writer:
        writer.write(pd.DataFrame({"p": [0.1, 0.2]}))
        writer.write(bad)  # fails in the background thread: raised by close
    assert out.read_bytes() == b"complete earlier predictions"
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def test_a_background_write_error_stops_the_next_write(tmp_path):
    out = tmp_path / "p.parquet"
    with pytest.raises(pa.ArrowException, match="not a float"), TableWriter(out, background=True) as writer:
        writer.write(pd.DataFrame({"p": [0.5, "not a float"]}))
        writer._pending.exception()  # wait until the background write has failed
        writer.write(pd.DataFrame({"p": [0.1]}))  # raises the earlier error here
        pytest.fail("the write after a failed one went through")
    assert list(tmp_path.iterdir()) == []


def test_background_writes_append_in_order(tmp_path):
    out = tmp_path / "p.csv"
    parts = [pd.DataFrame({"n": np.arange(i * 5, i * 5 + 5), "p": np.float32(i / 7)}) for i in range(4)]
    with TableWriter(out, background=True) as writer:
        for part in parts:
            writer.write(part)
    back = pd.read_csv(out)
    assert back["n"].tolist() == list(range(20))
    np.testing.assert_array_equal(back["p"].to_numpy(np.float32), np.repeat(np.float32([0, 1 / 7, 2 / 7, 3 / 7]), 5))
