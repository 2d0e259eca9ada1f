"""The fused embedding tables: one weight per embedding width, each table a block of rows."""

from __future__ import annotations

import torch

from funnel.data.layout import FeatureLayout, FieldLayout, TableLayout
from funnel.data.table import CAT, NUM, SEQ, seq_key
from funnel.models.embedding import SharedEmbeddings


def cat_field(name: str, table: str, column: int, dim: int) -> FieldLayout:
    return FieldLayout(name, "categorical", CAT, table, dim, column=column)


LAYOUT = FeatureLayout(
    tables=(TableLayout("u", 5, 3), TableLayout("d", 4, 2), TableLayout("i", 7, 3), TableLayout("pos", 3, 3)),
    fields=(
        cat_field("u", "u", 0, 3),
        cat_field("d", "d", 1, 2),  # another width
        cat_field("i", "i", 2, 3),
        cat_field("i2", "i", 3, 3),  # share_with: i
        cat_field("pos", "pos", 4, 3),  # excluded
        FieldLayout("hist", "sequence", SEQ, "i", 3, pooling="sum"),
    ),
    numeric_dim=2,
)


def batch() -> dict[str, torch.Tensor]:
    return {
        CAT: torch.tensor([[1, 0, 6, 2, 1], [4, 3, 1, 1, 2]]),
        seq_key("hist"): torch.tensor([[0, 2, 5], [0, 0, 0]]),
        NUM: torch.tensor([[0.5, -1.0], [2.0, 0.0]]),
    }


def test_tables_of_one_width_share_a_fused_weight_in_layout_order():
    emb = SharedEmbeddings(LAYOUT, exclude=frozenset({"pos"}))
    assert emb.table_names == ("u", "d", "i")  # pos is the bias tower's
    assert emb.slots == {"u": ("d3", 0, 5), "d": ("d2", 0, 4), "i": ("d3", 5, 7)}
    assert emb.fused["d3"].weight.shape == (12, 3) and emb.fused["d2"].weight.shape == (4, 2)
    assert torch.equal(emb.table_weight("i"), emb.fused["d3"].weight[5:12])


def test_each_field_gets_its_own_tables_rows_and_flat_keeps_the_feature_order():
    emb = SharedEmbeddings(LAYOUT, exclude=frozenset({"pos"}))
    b = batch()
    x = emb(b)
    w = {name: emb.table_weight(name).detach() for name in emb.table_names}
    torch.testing.assert_close(x.fields["u"], w["u"][[1, 4]])
    torch.testing.assert_close(x.fields["d"], w["d"][[0, 3]])
    torch.testing.assert_close(x.fields["i"], w["i"][[6, 1]])
    torch.testing.assert_close(x.fields["i2"], w["i"][[2, 1]])  # the shared table, not a copy
    torch.testing.assert_close(x.fields["hist"], torch.stack([w["i"][2] + w["i"][5], torch.zeros(3)]))
    expected = torch.cat([x.fields[n] for n in ("u", "d", "i", "i2", "hist")] + [b[NUM]], 1)
    torch.testing.assert_close(x.flat, expected)
    assert x.flat.shape == (2, emb.shape.flat_dim) == (2, 3 + 2 + 3 + 3 + 3 + 2)


def test_one_width_gives_the_same_flat_as_the_per_field_concatenation():
    layout = FeatureLayout(
        tables=(TableLayout("a", 4, 2), TableLayout("b", 6, 2)),
        fields=(cat_field("a", "a", 0, 2), cat_field("b", "b", 1, 2)),
        numeric_dim=1,
    )
    emb = SharedEmbeddings(layout)
    b = {CAT: torch.tensor([[3, 5], [0, 1]]), NUM: torch.tensor([[1.0], [2.0]])}
    x = emb(b)
    wa, wb = emb.table_weight("a").detach(), emb.table_weight("b").detach()
    torch.testing.assert_close(x.flat, torch.cat([wa[[3, 0]], wb[[5, 1]], b[NUM]], 1))


def test_gradients_reach_only_the_rows_looked_up():
    emb = SharedEmbeddings(LAYOUT, exclude=frozenset({"pos"}))
    emb(batch()).flat.sum().backward()
    touched = emb.table_grad("i").abs().sum(1) > 0
    assert touched.tolist() == [False, True, True, False, False, True, True]  # 6, 1, 2, 1 and history 2, 5
    assert (emb.table_grad("u").abs().sum(1) > 0).tolist() == [False, True, False, False, True]


def test_a_checkpoint_with_one_table_per_feature_still_loads():
    emb = SharedEmbeddings(LAYOUT, exclude=frozenset({"pos"}))
    old = {f"tables.m_{name}.weight": torch.randn(emb.table_weight(name).shape) for name in emb.table_names}
    emb.load_state_dict(dict(old))
    for name in emb.table_names:
        torch.testing.assert_close(emb.table_weight(name).detach(), old[f"tables.m_{name}.weight"], rtol=0, atol=0)


def test_training_the_fused_tables_takes_the_same_steps_as_one_table_per_field():
    """Same weights in, same Adam steps out: the fused layout changes speed, not training."""
    emb = SharedEmbeddings(LAYOUT, exclude=frozenset({"pos"}))
    per_table = torch.nn.ModuleDict({n: torch.nn.Embedding(*emb.table_weight(n).shape) for n in emb.table_names})
    with torch.no_grad():
        for n, table in per_table.items():
            table.weight.copy_(emb.table_weight(n))
    head = torch.randn(emb.shape.flat_dim)
    columns = {"u": 0, "d": 1, "i": 2, "i2": 3}
    tables = {"u": "u", "d": "d", "i": "i", "i2": "i"}

    def per_table_flat(b):
        fields = [per_table[tables[f]](b[CAT][:, c]) for f, c in columns.items()]
        hist = (per_table["i"](b[seq_key("hist")]) * (b[seq_key("hist")] > 0).unsqueeze(-1)).sum(1)
        return torch.cat([*fields, hist, b[NUM]], 1)

    fused_opt = torch.optim.Adam(emb.parameters(), lr=0.1)
    plain_opt = torch.optim.Adam(per_table.parameters(), lr=0.1)
    for step in range(4):
        b = batch()
        b[CAT] = (b[CAT] + step) % torch.tensor([5, 4, 7, 7, 3])  # other rows each step
        for opt, flat in ((fused_opt, emb(b).flat), (plain_opt, per_table_flat(b))):
            opt.zero_grad()
            torch.sigmoid(flat @ head).sum().backward()
            opt.step()
    for n in emb.table_names:
        torch.testing.assert_close(emb.table_weight(n).detach(), per_table[n].weight.detach(), rtol=1e-6, atol=1e-7)


def test_lookup_gives_nn_embeddings_values_and_gradients_dense_and_sparse():
    from funnel.models.embedding import lookup

    ids = torch.tensor([[0, 3, 3], [5, 3, 1]])  # repeated ids: their gradients add up
    upstream = torch.randn(2, 3, 4)
    for sparse in (False, True):
        ours, ref = torch.nn.Embedding(6, 4, sparse=sparse), torch.nn.Embedding(6, 4, sparse=sparse)
        with torch.no_grad():
            ours.weight.copy_(ref.weight)
        out = lookup(ours, ids)
        torch.testing.assert_close(out, ref(ids), rtol=0, atol=0)
        (out * upstream).sum().backward()
        (ref(ids) * upstream).sum().backward()
        assert ours.weight.grad.is_sparse == sparse
        grad = ours.weight.grad.to_dense() if sparse else ours.weight.grad
        expected = ref.weight.grad.to_dense() if sparse else ref.weight.grad
        torch.testing.assert_close(grad, expected)
        torch.testing.assert_close(grad[3], upstream[0, 1] + upstream[0, 2] + upstream[1, 1])
