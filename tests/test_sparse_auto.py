"""optim.sparse_embeddings: auto: sparse row-wise updates above optim.sparse_min_rows, where the
config allows them; one decision (funnel/training/sparse_choice.py) read by every caller."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from funnel.errors import ConfigError
from funnel.models.registry import create_model
from funnel.models.weighting import GradNormWeighting
from funnel.runs import build_graph
from funnel.spec import config_from_dict
from funnel.spec.schema import OptimSpec
from funnel.training.lazy_adam import LazyAdam
from funnel.training.module import FunnelLightningModule, optimizer_params
from funnel.training.sparse_choice import choose, sparse_tables, table_rows

RAW = {
    "data": {"synthetic": {"rows": 200}},
    "features": [{"name": "user_id", "kind": "categorical", "hash_buckets": 999}],
    "funnel": {"embed_dim": 4, "stages": [{"name": "click"}, {"name": "conversion", "after": "click"}]},
}


class Tables(nn.Module):
    """Two tables of 600 and 500 rows: 1,100 in all."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Embedding(600, 2), nn.Embedding(500, 2)
        self.tower = nn.Linear(4, 1)


def test_auto_is_the_default_and_its_threshold_a_million_rows():
    o = OptimSpec()
    assert (o.sparse_embeddings, o.sparse_min_rows) == ("auto", 1_000_000)


@pytest.mark.parametrize(
    ("min_rows", "sparse"),
    [(1_099, True), (1_100, False), (5_000, False)],
    ids=["above", "equal", "below"],
)
def test_auto_is_sparse_only_above_the_threshold(min_rows, sparse):
    assert table_rows(Tables()) == 1_100
    assert sparse_tables(OptimSpec(sparse_min_rows=min_rows), Tables()) is sparse


def test_true_and_false_are_taken_as_written():
    assert sparse_tables(OptimSpec(sparse_embeddings=True, sparse_min_rows=10**9), Tables()) is True
    assert sparse_tables(OptimSpec(sparse_embeddings=False, sparse_min_rows=0), Tables()) is False


@pytest.mark.parametrize(
    ("optim", "clip", "gradnorm", "why"),
    [
        ({"name": "adamw"}, False, False, "optim.name is adamw, not adam"),
        ({"weight_decay": 0.01}, False, False, "optim.weight_decay is not 0"),
        ({}, True, False, "trainer.gradient_clip_val is set"),
        ({}, False, True, "loss_weighting gradnorm needs dense table gradients"),
    ],
    ids=["adamw", "weight_decay", "gradient_clip_val", "gradnorm"],
)
def test_auto_stays_dense_where_the_config_does_not_allow_sparse(optim, clip, gradnorm, why):
    model = Tables()
    if gradnorm:
        model.weighting = GradNormWeighting(["click", "conversion"], [1.0, 1.0])
    choice = choose(OptimSpec(sparse_min_rows=0, **optim), model, clip)
    assert choice.sparse is False
    assert (
        choice.message() == f"embedding tables: 1,100 rows: dense optimiser (optim.sparse_embeddings: auto, but {why})"
    )


def test_the_choice_says_rows_kind_and_reason():
    choice = choose(OptimSpec(sparse_min_rows=1_000), Tables())
    assert choice.message() == (
        "embedding tables: 1,100 rows: sparse row-wise Adam "
        "(optim.sparse_embeddings: auto, above optim.sparse_min_rows=1,000)"
    )
    small = choose(OptimSpec(), Tables())
    assert small.message() == (
        "embedding tables: 1,100 rows: dense optimiser "
        "(optim.sparse_embeddings: auto, at most optim.sparse_min_rows=1,000,000)"
    )


def test_auto_with_weight_decay_is_a_valid_config_but_true_is_not():
    config_from_dict(RAW | {"optim": {"weight_decay": 0.01}})  # auto: dense, no error
    with pytest.raises(ConfigError, match="sparse_embeddings cannot apply weight_decay"):
        config_from_dict(RAW | {"optim": {"sparse_embeddings": True, "weight_decay": 0.01}})
    with pytest.raises(ConfigError, match="gradient_clip_val"):
        config_from_dict(RAW | {"optim": {"sparse_embeddings": True}, "trainer": {"gradient_clip_val": 1.0}})
    config_from_dict(RAW | {"trainer": {"gradient_clip_val": 1.0}})  # auto: dense, no error


def test_bad_values_are_refused_with_the_key():
    with pytest.raises(ConfigError, match=r"optim.sparse_embeddings: 'maybe' is not one of 'auto' or true or false"):
        config_from_dict(RAW | {"optim": {"sparse_embeddings": "maybe"}})
    with pytest.raises(ConfigError, match=r"optim.sparse_min_rows must be 0 or more .*-1"):
        config_from_dict(RAW | {"optim": {"sparse_min_rows": -1}})


def _module(optim: dict, clip: bool = False) -> FunnelLightningModule:
    cfg = config_from_dict(RAW | {"optim": optim})
    graph = build_graph(cfg)
    from funnel.data.datamodule import FunnelDataModule

    dm = FunnelDataModule(cfg, graph)
    dm.prepare()
    model = create_model(graph, cfg.funnel, dm.featurizer.layout())
    return FunnelLightningModule(model, cfg.optim, clip=clip)


def test_the_module_builds_the_optimisers_the_choice_names():
    """1,000 rows: user_id's 999 buckets and its unknown row."""
    sparse = _module({"sparse_min_rows": 999})
    assert sparse.sparse and not sparse.automatic_optimization
    lazy, adam = sparse.configure_optimizers()
    assert isinstance(lazy, LazyAdam) and isinstance(adam, torch.optim.Adam)
    tables = [m for m in sparse.model.modules() if isinstance(m, nn.Embedding)]
    assert all(t.sparse for t in tables)
    assert [p for g in lazy.param_groups for p in g["params"]] == [t.weight for t in tables]
    assert optimizer_params(sparse.model, sparse.optim) == [
        [t.weight for t in tables],
        list(adam.param_groups[0]["params"]),
    ]

    clipped = _module({"sparse_min_rows": 999}, clip=True)  # auto under gradient clipping: dense
    assert not clipped.sparse and clipped.automatic_optimization
    assert isinstance(clipped.configure_optimizers(), torch.optim.Adam)
    assert len(optimizer_params(clipped.model, clipped.optim, clip=True)) == 1

    dense = _module({})  # far below a million rows
    assert not dense.sparse and isinstance(dense.configure_optimizers(), torch.optim.Adam)


def test_fit_logs_the_choice_once(tmp_path, caplog):
    from funnel.api import fit

    raw = RAW | {
        "optim": {"sparse_min_rows": 999},
        "trainer": {"max_epochs": 1, "log_every_n_steps": 1, "monitor": "val/loss", "mode": "min"},
        "run_dir": str(tmp_path / "run"),
    }
    with caplog.at_level(logging.INFO, logger="funnel.training.module"):
        fit(config_from_dict(raw))
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("embedding tables:")]
    assert len(said) == 1 and "sparse row-wise Adam (optim.sparse_embeddings: auto, above" in said[0]


def test_touched_rows_sums_repeated_ids_without_coalescing():
    from funnel.training.lazy_adam import touched_rows

    ids = torch.tensor([[5, 1, 5, 9, 1, 5]])
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0], [10.0, 20.0], [7.0, 8.0], [0.5, 0.5], [100.0, 200.0]])
    grad = torch.sparse_coo_tensor(ids, values, (12, 2), check_invariants=True)
    rows, g = touched_rows(grad)
    assert rows.tolist() == [1, 5, 9]
    assert g.tolist() == [[3.5, 4.5], [111.0, 222.0], [7.0, 8.0]]
    rows, g = touched_rows(grad.coalesce())  # already summed: taken as it is
    assert rows.tolist() == [1, 5, 9] and g.tolist() == [[3.5, 4.5], [111.0, 222.0], [7.0, 8.0]]


def test_lazy_adam_on_the_lookup_gradient_steps_as_torch_sparse_adam():
    """Ten steps of funnel's lookup (uncoalesced (id, row) pairs, many repeats) on a 50-row table:
    LazyAdam's weights and moments are SparseAdam's, step for step."""
    from funnel.models.embedding import lookup

    gen = torch.Generator().manual_seed(3)
    tables = []
    for _ in range(2):
        torch.manual_seed(0)
        tables.append(nn.Embedding(50, 3, sparse=True))
    ours, theirs = LazyAdam(tables[0].parameters(), lr=0.01), torch.optim.SparseAdam(tables[1].parameters(), lr=0.01)
    for _ in range(10):
        ids = (torch.rand(16, 4, generator=gen) ** 3 * 50).long()  # skewed: low ids repeat
        target = torch.randn(16, 4, 3, generator=gen)
        for table, opt in ((tables[0], ours), (tables[1], theirs)):
            opt.zero_grad()
            ((lookup(table, ids) - target) ** 2).sum().backward()
            opt.step()
        torch.testing.assert_close(tables[0].weight, tables[1].weight, rtol=1e-6, atol=1e-7)
    mine, torch_state = ours.state[tables[0].weight], theirs.state[tables[1].weight]
    torch.testing.assert_close(mine["exp_avg"], torch_state["exp_avg"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(mine["exp_avg_sq"], torch_state["exp_avg_sq"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("rows", "advise"),
    [(1_000, "1"), (1_100_000, "1"), (1_100_000, "0")],  # 1.1M x 16 x 4 B > 64 MiB: advised when enabled
    ids=["small", "huge_pages", "huge_pages_off"],
)
def test_tables_in_huge_pages_keep_nn_embeddings_initial_values(rows, advise, monkeypatch):
    from funnel.models import huge_pages
    from funnel.models.embedding import _table

    monkeypatch.setenv("FUNNEL_HUGE_PAGES", advise)

    torch.manual_seed(7)
    plain = nn.Embedding(rows, 16).weight.detach()
    torch.manual_seed(7)
    ours = _table(rows, 16)
    assert torch.equal(ours.weight.detach(), plain) and ours.weight.requires_grad and not ours.sparse
    zeros = huge_pages.zeros_like(ours.weight)
    assert zeros.shape == (rows, 16) and zeros.dtype == torch.float32 and not zeros.any()
