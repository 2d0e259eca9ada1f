"""optim.ema_decay: the weights' moving average is what is validated and kept as best.ckpt.

The end-to-end tests record the training weights after every optimiser step and recompute the
average by hand (float64): best.ckpt must hold it, not the last step's weights.
"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

import funnel
from funnel.spec.loader import config_from_dict
from funnel.training.averaging import WeightAverage, decay_at
from funnel.training.fit import extra_callbacks, fit_config

DECAY = 0.9


class Recorder(pl.Callback):
    """The model's training weights before the first step and after every optimiser step."""

    def __init__(self) -> None:
        self.start: dict[str, torch.Tensor] = {}
        self.steps: list[dict[str, torch.Tensor]] = []
        self.tables: set[str] = set()  # the state_dict keys of the embedding tables

    @staticmethod
    def _copy(module: pl.LightningModule) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone().double() for k, v in module.state_dict().items() if v.is_floating_point()}

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = self._copy(pl_module)
        embeddings = pl_module.named_modules()
        self.tables = {f"{name}.weight" for name, m in embeddings if isinstance(m, torch.nn.Embedding)}

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.steps.append(self._copy(pl_module))


def _hand_average(rec: Recorder, decay: float, warmup: bool) -> dict[str, torch.Tensor]:
    avg = {k: v.clone() for k, v in rec.start.items()}
    for n, weights in enumerate(rec.steps, start=1):
        d = min(decay, (1 + n) / (10 + n)) if warmup else decay
        for k in avg:
            avg[k] = d * avg[k] + (1 - d) * weights[k]
    return avg


def _fit(base_config, **optim) -> tuple[dict[str, torch.Tensor], Recorder, object]:
    base_config["optim"] = {**base_config["optim"], **optim}
    rec = Recorder()
    with extra_callbacks(rec):
        run_dir = fit_config(config_from_dict(base_config))
    best = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    return {k: v.double() for k, v in best["state_dict"].items()}, rec, run_dir


def test_decay_ramps_up_then_holds():
    assert decay_at(0.999, 1, warmup=True) == pytest.approx(2 / 11)
    assert decay_at(0.999, 100, warmup=True) == pytest.approx(101 / 110)
    assert decay_at(0.999, 10_000, warmup=True) == 0.999  # (1 + n) / (10 + n) passes 0.999 at n = 8,991
    assert decay_at(0.999, 1, warmup=False) == 0.999


@pytest.mark.parametrize("warmup", [True, False])
def test_best_checkpoint_holds_the_hand_computed_average(base_config, warmup):
    best, rec, _ = _fit(base_config, ema_decay=DECAY, ema_warmup=warmup)  # one epoch: best = its end
    assert len(rec.steps) == 10  # 2,400 rows / batch 256
    expected = _hand_average(rec, DECAY, warmup)
    last = rec.steps[-1]
    assert set(best) >= set(expected)
    for k, v in expected.items():
        torch.testing.assert_close(best[k], v, rtol=1e-5, atol=1e-6, msg=k)
    moved = [k for k in expected if not torch.allclose(best[k], last[k], rtol=1e-4, atol=1e-5)]
    assert moved, "the average equals the last step's weights: nothing was averaged"


def test_without_ema_best_checkpoint_is_the_last_step(base_config):
    best, rec, _ = _fit(base_config)
    for k, v in rec.steps[-1].items():
        torch.testing.assert_close(best[k], v, msg=k)


def test_sparse_tables_keep_their_rows_and_the_rest_is_averaged(base_config):
    best, rec, _ = _fit(base_config, sparse_embeddings=True, ema_decay=DECAY)
    expected = _hand_average(rec, DECAY, warmup=True)
    last = rec.steps[-1]
    assert rec.tables and rec.tables <= set(expected), sorted(expected)
    for k in expected:
        want = last[k] if k in rec.tables else expected[k]
        torch.testing.assert_close(best[k], want, rtol=1e-5, atol=1e-6, msg=k)
    assert any(not torch.allclose(best[k], last[k]) for k in expected if k not in rec.tables)


def test_predictions_come_from_the_average(base_config, synth_dir):
    run_ema = funnel.fit(base_config, ["optim.ema_decay=0.9"])
    base_config["run_dir"] = base_config["run_dir"] + "-plain"
    run_plain = funnel.fit(base_config)
    import pandas as pd

    rows = pd.read_csv(synth_dir / "test.csv").head(200)
    a, b = run_ema.predict(rows), run_plain.predict(rows)
    assert not a["p_click"].equals(b["p_click"])  # same seed, same batches: only the average differs


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5])
def test_bad_decay_is_refused(bad):
    with pytest.raises(ValueError, match="ema_decay"):
        funnel.spec.schema.OptimSpec(ema_decay=bad)
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(bad)


def test_a_bfloat16_model_is_averaged_in_float32():
    """bfloat16 has 8 bits of mantissa: avg + 0.005 * (2 - avg) rounds back to avg = 1."""
    from types import SimpleNamespace

    layer = torch.nn.Linear(1, 1, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    trainer = SimpleNamespace(is_global_zero=True, global_step=0)
    cb = WeightAverage(0.995, warmup=False)
    cb.setup(trainer, layer, "fit")
    with torch.no_grad():
        layer.weight.fill_(2.0)  # one jump, then 100 steps at 2
    for step in range(1, 101):
        trainer.global_step = step
        cb.on_train_batch_end(trainer, layer)
    expected = 2.0 - 0.995**100  # 1.3942...
    assert cb.state_dict()["average"][0].dtype == torch.float32
    assert cb.state_dict()["average"][0].item() == pytest.approx(expected, rel=1e-5)
    cb._use_average()
    assert layer.weight.item() == pytest.approx(expected, abs=0.01)  # rounded to bfloat16 to validate
    cb._use_training_weights()
    assert layer.weight.item() == 2.0
