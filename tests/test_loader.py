"""Tests for funnel.data.loader.BatchLoader: coverage, order, seeding and sharding."""

from __future__ import annotations

import pytest
import torch

from funnel.data.loader import BatchLoader
from funnel.data.table import CAT, LABELS, NUM, EncodedTable, seq_key

N = 103  # not a multiple of the batch size or of the world size


def table(n: int = N) -> EncodedTable:
    """Row i holds i in every tensor, so a batch shows which rows it gathered."""
    ids = torch.arange(n)
    return EncodedTable(
        cat=ids.unsqueeze(1).repeat(1, 2),
        num=ids.float().unsqueeze(1),
        seq={"hist": ids.unsqueeze(1).repeat(1, 3)},
        labels=torch.stack([ids.float(), -ids.float()], 1),
    )


def epoch(loader: BatchLoader) -> list[list[int]]:
    batches = []
    for b in loader:
        rows = b[CAT][:, 0]
        # every tensor of a batch holds the same rows
        assert torch.equal(b[NUM][:, 0].long(), rows) and torch.equal(b[seq_key("hist")][:, 2], rows)
        assert torch.equal(b[LABELS][:, 0].long(), rows)
        batches.append(rows.tolist())
    return batches


def flat(batches: list[list[int]]) -> list[int]:
    return [i for b in batches for i in b]


def test_no_shuffle_batches_are_in_row_order():
    batches = epoch(BatchLoader(table(), 10))
    assert len(batches) == 11
    assert batches[0] == list(range(10)) and batches[-1] == [100, 101, 102]
    assert flat(batches) == list(range(N))


def test_len_counts_the_last_partial_batch_unless_dropped():
    assert len(BatchLoader(table(), 10)) == 11
    loader = BatchLoader(table(), 10, drop_last=True)
    assert len(loader) == 10 and len(flat(epoch(loader))) == 100


def test_shuffle_covers_every_row_exactly_once_per_epoch():
    loader = BatchLoader(table(), 16, shuffle=True, seed=3)
    for _ in range(3):
        rows = flat(epoch(loader))
        assert sorted(rows) == list(range(N))
        assert rows != list(range(N))


def test_shuffle_draws_a_new_permutation_each_epoch():
    loader = BatchLoader(table(), 16, shuffle=True, seed=3)
    first, second = flat(epoch(loader)), flat(epoch(loader))
    assert first != second


def test_same_seed_gives_the_same_sequence_of_batches():
    a = BatchLoader(table(), 16, shuffle=True, seed=7)
    b = BatchLoader(table(), 16, shuffle=True, seed=7)
    assert [epoch(a) for _ in range(2)] == [epoch(b) for _ in range(2)]
    c = BatchLoader(table(), 16, shuffle=True, seed=8)
    assert epoch(c) != epoch(BatchLoader(table(), 16, shuffle=True, seed=7))


@pytest.mark.parametrize("order", ["global", "blocks"])
@pytest.mark.parametrize("world_size", [2, 4])
def test_training_ranks_get_disjoint_shards_of_equal_size(order, world_size):
    def loader(r: int) -> BatchLoader:
        return BatchLoader(
            table(), 8, shuffle=True, seed=1, rank=r, world_size=world_size, order=order, block_rows=10, buffer_blocks=3
        )

    shards = [flat(epoch(loader(r))) for r in range(world_size)]
    sizes = {len(s) for s in shards}
    assert len(sizes) == 1  # every rank as many rows ...
    assert {len(loader(r)) for r in range(world_size)} == {-(-sizes.pop() // 8)}  # ... and steps
    union = set().union(*map(set, shards))
    assert len(union) == sum(map(len, shards))  # disjoint
    assert union <= set(range(N))
    # at most world_size - 1 rows per buffer are left out, so that the ranks stay equal
    buffers = 1 if order == "global" else -(-N // 30)
    assert N - len(union) <= buffers * (world_size - 1)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_evaluation_ranks_cover_every_row_once_in_contiguous_ranges(world_size):
    shards = [flat(epoch(BatchLoader(table(), 8, rank=r, world_size=world_size))) for r in range(world_size)]
    assert [i for s in shards for i in s] == list(range(N))  # all rows, none twice, no padding
    for s in shards:
        assert s == list(range(s[0], s[0] + len(s)))
    assert [len(BatchLoader(table(), 8, rank=r, world_size=world_size)) for r in range(world_size)] == [
        -(-len(s) // 8) for s in shards
    ]


def test_blocks_order_covers_every_row_once_and_keeps_blocks_within_a_buffer():
    loader = BatchLoader(table(), 16, shuffle=True, seed=3, order="blocks", block_rows=10, buffer_blocks=2)
    first = flat(epoch(loader))
    assert sorted(first) == list(range(N))
    assert first != list(range(N)) and first != flat(epoch(loader))  # shuffled, and anew each epoch
    # a block's rows lie within its buffer of two 10-row blocks: at most 20 positions apart
    position = {row: k for k, row in enumerate(first)}
    for block in range(-(-N // 10)):
        places = [position[i] for i in range(block * 10, min(block * 10 + 10, N))]
        assert max(places) - min(places) < 20
    again = BatchLoader(table(), 16, shuffle=True, seed=3, order="blocks", block_rows=10, buffer_blocks=2)
    assert flat(epoch(again)) == first  # reproducible from the seed


def test_blocks_with_one_buffer_of_everything_is_a_full_shuffle():
    loader = BatchLoader(table(), 16, shuffle=True, seed=3, order="blocks", block_rows=N, buffer_blocks=1)
    rows = flat(epoch(loader))
    assert sorted(rows) == list(range(N)) and rows != list(range(N))


def test_a_batch_may_span_two_buffers_and_sizes_stay_fixed():
    loader = BatchLoader(table(), 16, shuffle=True, seed=0, order="blocks", block_rows=7, buffer_blocks=1)
    sizes = [len(b) for b in epoch(loader)]
    assert sizes[:-1] == [16] * (len(sizes) - 1) and sum(sizes) == N and len(sizes) == len(loader)


def test_ranks_of_one_epoch_share_one_permutation():
    """Sharding splits the same permutation: rank r takes every world_size-th row of it."""
    whole = flat(epoch(BatchLoader(table(), N, shuffle=True, seed=5)))
    rank1 = flat(epoch(BatchLoader(table(), N, shuffle=True, seed=5, rank=1, world_size=2)))
    assert rank1 == whole[1::2][: N // 2]
