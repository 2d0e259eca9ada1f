"""Warm start (init_from): vocabularies grow, known ids keep their rows, the old model's scores stay;
with warm_start.init_optimizer the optimiser state carries over too."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import pytorch_lightning as pl
import torch

from funnel.cli import main
from funnel.data.datamodule import FunnelDataModule
from funnel.errors import UserError
from funnel.inference import predict_table
from funnel.runs import BEST, LAST, build_graph
from funnel.spec import config_from_dict
from funnel.training import carry_optimizer, fit, warm_start
from funnel.training.module import optimizer_params
from tests.test_ddp import DDP, _funnel, _max_diff, _weights


@pytest.fixture(scope="module")
def first(make_config, tmp_path_factory):
    """Day 1: a run on the tiny synthetic CSVs."""
    base = tmp_path_factory.mktemp("warm")
    cfg = make_config(base / "day1")
    cfg["data"]["cache"] = False
    path = base / "day1.yaml"
    path.write_text(json.dumps(cfg))
    assert main(["fit", str(path)]) == 0
    return base, cfg


@pytest.fixture(scope="module")
def day2(first, synth_dir):
    """Day 2's train file: the first 600 rows get 150 users never seen on day 1 (new_0 ... new_149)."""
    base, _ = first
    frame = pd.read_csv(synth_dir / "train.csv")
    frame.loc[:599, "user_id"] = [f"new_{i % 150}" for i in range(600)]
    frame.to_csv(base / "day2.csv", index=False)
    return base / "day2.csv"


def day2_config(first, day2, run: str, **changes) -> dict:
    base, day1 = first
    cfg = json.loads(json.dumps(day1))
    cfg |= {"run_dir": str(base / run), "init_from": str(base / "day1")}
    cfg["data"]["train"] = str(day2)
    for key, value in changes.items():
        section, _, name = key.partition(".")
        cfg.setdefault(section, {})[name] = value
    return cfg


def test_before_training_the_warm_model_scores_known_ids_as_the_old_model(first, day2, synth_dir):
    cfg = config_from_dict(day2_config(first, day2, "unused"))
    graph = build_graph(cfg)
    source = warm_start.load_source(cfg)
    dm = FunnelDataModule(cfg, graph, grow_from=source.featurizer)
    dm.prepare()
    old_vocab = source.featurizer.encoders["user_id"].vocab
    new_vocab = dm.featurizer.encoders["user_id"].vocab
    assert new_vocab[: len(old_vocab)] == old_vocab  # every old id keeps its place (so its row)
    assert set(new_vocab[len(old_vocab) :]) == {f"new_{i}" for i in range(150)}  # the new users, appended
    model = warm_start.build_model(cfg, graph, dm.featurizer, source)

    test = pd.read_csv(synth_dir / "test.csv")  # day-1 ids only
    old = predict_table(source.model.eval(), source.featurizer.encode(test, "test", labels=False))
    new = predict_table(model.eval(), dm.featurizer.encode(test, "test", labels=False))
    pd.testing.assert_frame_equal(new, old, check_exact=False, atol=1e-6, rtol=0)

    old_rows = source.model.net.embeddings.table_weight("user_id")
    new_rows = model.net.embeddings.table_weight("user_id")
    assert torch.equal(new_rows[: len(old_rows)], old_rows)
    fresh = new_rows[len(old_rows) :]
    assert fresh.shape[0] == 150 and not torch.isclose(fresh, old_rows[:150]).all()  # fresh rows, not copies
    assert dm.featurizer.encoders["price"].state() == source.featurizer.encoders["price"].state()  # day 1's scale


def test_refit_numerics_fits_the_numeric_statistics_again(first, day2):
    raw = day2_config(first, day2, "unused", **{"warm_start.refit_numerics": True})
    raw["data"]["train"] = str(day2)
    frame = pd.read_csv(day2)
    frame["price"] = frame["price"] * 3
    frame.to_csv(day2.with_name("day2x3.csv"), index=False)
    raw["data"]["train"] = str(day2.with_name("day2x3.csv"))
    cfg = config_from_dict(raw)
    source = warm_start.load_source(cfg)
    dm = FunnelDataModule(cfg, build_graph(cfg), grow_from=source.featurizer)
    dm.prepare()
    assert dm.featurizer.encoders["price"].mean != source.featurizer.encoders["price"].mean


def test_fit_init_from_on_the_command_line_trains_the_next_day(first, day2, write_config, capsys):
    base, _ = first
    cfg = day2_config(first, day2, "day2")
    cfg.pop("init_from")
    assert main(["fit", str(write_config(cfg)), "--init-from", str(base / "day1")]) == 0
    assert json.loads((base / "day2" / "run.json").read_text())["status"] == "complete"
    saved = (base / "day2" / "config.yaml").read_text()
    assert f"init_from: {base / 'day1'}" in saved
    assert "init_from: started from" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"funnel.tower": {"type": "mlp", "hidden": [16]}}, ["funnel.tower", "hidden"]),
        ({"funnel.embed_dim": 8}, ["funnel.embed_dim"]),
    ],
)
def test_an_incompatible_run_is_refused_naming_the_difference(first, day2, write_config, capsys, change, words):
    base, _ = first
    cfg = day2_config(first, day2, "refused", **change)
    assert main(["fit", str(write_config(cfg))]) == 2
    err = capsys.readouterr().err
    assert "init_from" in err and all(w in err for w in words) and "Traceback" not in err
    assert not (base / "refused").exists()  # the claimed folder is removed again


def test_a_features_kind_change_is_refused(first, day2, write_config, capsys):
    cfg = day2_config(first, day2, "refused-kind")
    cfg["features"][2] = {"name": "device", "kind": "categorical", "hash_buckets": 7}
    assert main(["fit", str(write_config(cfg))]) == 2
    assert "feature 'device' has hash_buckets None there, 7 here" in capsys.readouterr().err


def test_init_from_a_folder_that_is_no_run_is_refused(first, day2, tmp_path, write_config, capsys):
    cfg = day2_config(first, day2, "refused-dir")
    (tmp_path / "empty").mkdir()
    cfg["init_from"] = str(tmp_path / "empty")
    assert main(["fit", str(write_config(cfg))]) == 2
    err = capsys.readouterr().err
    assert "init_from:" in err and "not a funnel run directory" in err


# ---- warm_start.init_optimizer ------------------------------------------------------------------


@pytest.fixture(scope="module")
def first_sparse(make_config, tmp_path_factory):
    """Day 1 with optim.sparse_embeddings: LazyAdam on the tables, Adam on the rest."""
    base = tmp_path_factory.mktemp("warm-sparse")
    cfg = make_config(base / "day1")
    cfg["data"]["cache"] = False
    cfg["optim"]["sparse_embeddings"] = True
    path = base / "day1.yaml"
    path.write_text(json.dumps(cfg))
    assert main(["fit", str(path)]) == 0
    return base, cfg


class _Probe(pl.Callback):
    """Records, by parameter name, the optimiser state before the first step, and the first
    step's weights and gradients before and after it."""

    def __init__(self):
        self.start: dict[str, dict] = {}
        self.before: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.after: dict[str, torch.Tensor] = {}
        self.lrs: list[float] = []

    def on_train_start(self, trainer, pl_module):
        self.names = {id(p): n for n, p in pl_module.model.named_parameters()}
        for opt in trainer.optimizers:
            self.lrs += [g["lr"] for g in opt.param_groups]
            for p, state in opt.state.items():
                self.start[self.names[id(p)]] = {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == 0 and not self.before:
            for n, p in pl_module.model.named_parameters():
                if p.grad is not None and not p.grad.is_sparse:
                    self.before[n] = (p.detach().clone(), p.grad.detach().clone())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.after:
            self.after = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()}


def warm_fit(first, day2, run: str, **changes) -> tuple[_Probe, warm_start.WarmSource, torch.nn.Module]:
    """One training step of a warm run, built as `funnel fit` builds it, with a _Probe."""
    base, _ = first
    cfg = config_from_dict(
        day2_config(first, day2, run, **{"trainer.limit_train_batches": 1, "trainer.limit_val_batches": 1, **changes})
    )
    source = warm_start.load_source(cfg)
    dm = FunnelDataModule(cfg, build_graph(cfg), grow_from=source.featurizer)
    dm.prepare()
    trainer, module, _, _ = fit._build_training(cfg, dm, base / run, source)
    probe = _Probe()
    trainer.callbacks.append(probe)
    trainer.fit(module, datamodule=dm)
    return probe, source, module.model


def old_states(first, k: int = 0) -> dict[int, dict]:
    """The k-th optimiser state day 1's last checkpoint holds (best.ckpt is weights only), by parameter index."""
    base, _ = first
    return torch.load(base / "day1" / LAST, map_location="cpu", weights_only=True)["optimizer_states"][k]["state"]


def assert_rows_carried(old: torch.Tensor, new: torch.Tensor, source_embeddings, embeddings) -> None:
    """Every table's old rows are where the same ids are now; the new ids' rows are zero."""
    for table, (_, first_new, rows_new) in embeddings.slots.items():
        _, first_old, rows_old = source_embeddings.slots[table]
        assert torch.equal(new[first_new : first_new + rows_old], old[first_old : first_old + rows_old]), table
        assert torch.equal(new[first_new + rows_old : first_new + rows_new], torch.zeros(rows_new - rows_old, 4))


def test_init_optimizer_starts_from_the_old_moments_and_takes_an_adam_step_from_them(first, day2):
    probe, source, model = warm_fit(first, day2, "carried", **{"warm_start.init_optimizer": True, "optim.lr": 0.003})
    names = [n for n, _ in source.model.named_parameters()]
    old = {names[i]: state for i, state in old_states(first).items()}
    dense = [n for n in names if "embeddings" not in n and n in probe.before]
    assert dense and set(probe.start) == set(old)
    for name in dense:  # copied as they are, step counts included
        assert torch.equal(probe.start[name]["exp_avg"], old[name]["exp_avg"])
        assert torch.equal(probe.start[name]["exp_avg_sq"], old[name]["exp_avg_sq"])
        assert probe.start[name]["step"] == old[name]["step"] > 0
    table = "net.embeddings.fused.d4.weight"
    assert table in old and probe.start[table]["step"] == old[table]["step"]
    assert model.net.embeddings.slots["user_id"][2] == source.model.net.embeddings.slots["user_id"][2] + 150  # grown
    for key in ("exp_avg", "exp_avg_sq"):
        assert_rows_carried(old[table][key], probe.start[table][key], source.model.net.embeddings, model.net.embeddings)
    assert probe.lrs == [0.003]  # this config's learning rate, not day 1's 0.01

    # the first step is Adam's from the old moments, by hand
    b1, b2, eps, lr = 0.9, 0.999, 1e-8, 0.003
    for name in dense:
        (w, g), m, v = probe.before[name], old[name]["exp_avg"], old[name]["exp_avg_sq"]
        t = float(old[name]["step"]) + 1
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        expected = w - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        torch.testing.assert_close(probe.after[name], expected, rtol=1e-5, atol=1e-7)


def test_without_init_optimizer_the_optimiser_state_is_empty_at_start(first, day2):
    probe, _, _ = warm_fit(first, day2, "afresh", **{"optim.lr": 0.003})
    assert probe.start == {} and probe.lrs == [0.003]
    assert probe.before  # it did train a step, from nothing


def test_init_optimizer_with_lazy_adam_carries_both_optimisers(first_sparse, day2):
    probe, source, model = warm_fit(first_sparse, day2, "carried-sparse", **{"warm_start.init_optimizer": True})
    tables, dense = optimizer_params(source.model, source.config.optim)
    names = {id(p): n for n, p in source.model.named_parameters()}
    lazy = {names[id(tables[i])]: s for i, s in old_states(first_sparse, 0).items()}
    adam = {names[id(dense[i])]: s for i, s in old_states(first_sparse, 1).items()}
    table = "net.embeddings.fused.d4.weight"
    assert list(lazy) == [table] and isinstance(lazy[table]["step"], int)
    assert probe.start[table]["step"] == lazy[table]["step"] > 0  # LazyAdam's own count, kept
    for key in ("exp_avg", "exp_avg_sq"):
        assert_rows_carried(
            lazy[table][key], probe.start[table][key], source.model.net.embeddings, model.net.embeddings
        )
    assert adam and all(torch.equal(probe.start[n]["exp_avg_sq"], s["exp_avg_sq"]) for n, s in adam.items())
    assert set(probe.start) == {table, *adam}


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["optim.name=adamw"], ["optim.name: adam,", "optim.name: adamw,"]),
        (["optim.sparse_embeddings=true"], ["optim.sparse_embeddings: false", "optim.sparse_embeddings: true"]),
    ],
)
def test_init_optimizer_refuses_another_optimiser(first, day2, write_config, capsys, overrides, words):
    base, _ = first
    cfg = day2_config(first, day2, "refused-optim")
    assert main(["fit", str(write_config(cfg)), "warm_start.init_optimizer=true", *overrides]) == 2
    err = capsys.readouterr().err
    assert "warm_start.init_optimizer" in err and "Drop warm_start.init_optimizer" in err and "Traceback" not in err
    assert all(w in err for w in words), err
    assert not (base / "refused-optim").exists()  # refused before training: the claimed folder is removed


def test_fit_with_init_optimizer_on_the_command_line_completes(first, day2, write_config, capsys):
    base, _ = first
    cfg = day2_config(first, day2, "day2-carried")
    assert main(["fit", str(write_config(cfg)), "warm_start.init_optimizer=true"]) == 0
    assert json.loads((base / "day2-carried" / "run.json").read_text())["status"] == "complete"
    assert "init_optimizer: true" in (base / "day2-carried" / "config.yaml").read_text()
    carried = len(old_states(first))  # every parameter of day 1 had been stepped
    assert (
        carried > 0
        and f"optimiser state of {carried} parameters from {base / 'day1' / LAST}" in capsys.readouterr().err
    )


def test_the_last_checkpoint_gives_the_state_when_the_best_has_none(first, tmp_path):
    base, _ = first
    run = tmp_path / "day1"
    shutil.copytree(base / "day1", run)
    best = torch.load(run / BEST, map_location="cpu", weights_only=True)
    assert "optimizer_states" not in best  # funnel writes best.ckpt with the weights only
    path, states = carry_optimizer.saved_states(run)
    assert path == run / LAST
    last = torch.load(run / LAST, map_location="cpu", weights_only=True)["optimizer_states"]
    assert torch.equal(states[0]["state"][0]["exp_avg"], last[0]["state"][0]["exp_avg"])
    torch.save(best, run / LAST)
    with pytest.raises(UserError, match="holds an optimiser state"):
        carry_optimizer.saved_states(run)


def test_under_ddp_every_rank_starts_from_the_carried_state(first, day2, write_config):
    """Rank 1 loads the state as rank 0 does: 2 ranks x B/2 take the one-process steps (a rank
    left with fresh moments would step its weights apart and move the gradients by about 1e-2)."""
    base, _ = first
    path = write_config(day2_config(first, day2, "ddp-unused", **{"warm_start.init_optimizer": True}))
    assert main(["fit", str(path), f"run_dir={base / 'carried-one'}"]) == 0
    ddp = _funnel(["fit", str(path), *DDP, f"run_dir={base / 'carried-ddp'}"], base)
    assert ddp.returncode == 0, ddp.stderr
    (one, steps_one), (two, steps_ddp) = _weights(base / "carried-one"), _weights(base / "carried-ddp")
    assert steps_one == steps_ddp == 10
    assert _max_diff(one, two) < 1e-5


def _stepped_adam_state(model: torch.nn.Module) -> dict:
    opt = torch.optim.Adam(model.parameters())
    for p in model.parameters():
        p.grad = torch.arange(p.numel(), dtype=torch.float32).reshape(p.shape) + 1
    opt.step()
    return opt.state_dict()


def test_carried_states_grow_a_plain_embedding_and_refuse_another_shape_by_name(tmp_path):
    torch.manual_seed(0)
    old = torch.nn.Sequential(torch.nn.Embedding(3, 2), torch.nn.Linear(2, 1))
    saved = [_stepped_adam_state(old)]
    grown = torch.nn.Sequential(torch.nn.Embedding(5, 2), torch.nn.Linear(2, 1))
    states = carry_optimizer.carried_states(old, grown, saved, [list(old.parameters())], tmp_path)
    g = torch.arange(6, dtype=torch.float32).reshape(3, 2) + 1
    assert torch.equal(states["0.weight"]["exp_avg"], torch.cat([0.1 * g, torch.zeros(2, 2)]))  # (1 - beta1) g
    assert torch.equal(states["1.bias"]["exp_avg_sq"], saved[0]["state"][2]["exp_avg_sq"])
    assert float(states["0.weight"]["step"]) == 1.0

    wider = torch.nn.Sequential(torch.nn.Embedding(3, 2), torch.nn.Linear(2, 4))
    with pytest.raises(UserError, match=r"parameter 1\.weight has shape \(1, 2\) .* and \(4, 2\) here"):
        carry_optimizer.carried_states(old, wider, saved, [list(old.parameters())], tmp_path)
