"""Tests for funnel.data.table: the batch keys, named in one place, and row selection."""

from __future__ import annotations

import torch

from funnel.data.table import CAT, LABELS, NUM, EncodedTable, seq_key, take, truth_key, truth_of


def table() -> EncodedTable:
    ids = torch.arange(4)
    return EncodedTable(
        cat=ids.unsqueeze(1),
        num=ids.float().unsqueeze(1),
        seq={"hist": ids.unsqueeze(1).repeat(1, 2)},
        labels=ids.float().unsqueeze(1),
        truth={"cf": -ids.float().unsqueeze(1)},
        rows=ids,
    )


def test_a_batch_has_the_keys_named_in_table_py():
    assert list(table().tensors()) == [CAT, NUM, seq_key("hist"), LABELS, truth_key("cf")]
    assert [CAT, NUM, LABELS, seq_key("hist"), truth_key("cf")] == ["cat", "num", "labels", "seq/hist", "truth/cf"]


def test_truth_of_gives_the_truth_of_a_batch_by_kind():
    batch = take(table().tensors(), slice(1, 3))
    assert list(truth_of(batch)) == ["cf"]
    assert truth_of(batch)["cf"].flatten().tolist() == [-1.0, -2.0]
    assert truth_of({CAT: batch[CAT]}) == {}


def test_select_keeps_the_same_rows_of_every_tensor():
    kept = table().select(torch.tensor([True, False, True, True]))
    assert kept.rows.tolist() == [0, 2, 3] and len(kept) == 3
    for key, tensor in kept.tensors().items():
        assert tensor.reshape(3, -1)[:, 0].abs().tolist() == [0, 2, 3], key
