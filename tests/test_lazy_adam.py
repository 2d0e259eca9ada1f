"""LazyAdam: SparseAdam's arithmetic on the rows a batch touched, checked against torch's SparseAdam
and against the one-pass update it made before its rows were chunked."""

from __future__ import annotations

import pytest
import torch

from funnel.training.lazy_adam import LazyAdam


def trajectory(opt_cls, batches, steps_ids):
    torch.manual_seed(0)
    table = torch.nn.Embedding(10, 3, sparse=True)
    opt = opt_cls(table.parameters(), lr=0.05)
    for ids, target in zip(steps_ids, batches, strict=True):
        opt.zero_grad()
        loss = ((table(ids) - target) ** 2).sum()
        loss.backward()
        opt.step()
    return table.weight.detach().clone(), opt


def test_lazy_adam_takes_the_same_steps_as_torch_sparse_adam():
    gen = torch.Generator().manual_seed(1)
    ids = [torch.tensor([1, 4, 4, 7]), torch.tensor([4, 2]), torch.tensor([9, 1, 1, 1, 0])]  # repeats summed
    targets = [torch.randn(len(i), 3, generator=gen) for i in ids]
    ours, opt = trajectory(LazyAdam, targets, ids)
    theirs, _ = trajectory(torch.optim.SparseAdam, targets, ids)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    assert opt.state[opt.param_groups[0]["params"][0]]["step"] == 3


def test_rows_no_batch_touched_keep_their_weights_and_moments():
    ids = [torch.tensor([1, 2]), torch.tensor([2])]
    targets = [torch.ones(2, 3), torch.ones(1, 3)]
    torch.manual_seed(0)
    initial = torch.nn.Embedding(10, 3).weight.detach().clone()
    weights, opt = trajectory(LazyAdam, targets, ids)
    untouched = [0, 3, 4, 5, 6, 7, 8, 9]
    torch.testing.assert_close(weights[untouched], initial[untouched], rtol=0, atol=0)
    state = opt.state[opt.param_groups[0]["params"][0]]
    assert state["exp_avg"][untouched].abs().sum() == 0 and state["exp_avg"][[1, 2]].abs().sum() > 0
    assert not torch.equal(weights[[1, 2]], initial[[1, 2]])


def test_first_step_moves_each_touched_weight_by_lr():
    """Adam's first step is lr * g / (|g| + eps') per coordinate: lr in the direction of -g."""
    table = torch.nn.Embedding(4, 2, sparse=True)
    before = table.weight.detach().clone()
    opt = LazyAdam(table.parameters(), lr=0.1)
    (table(torch.tensor([3])) * torch.tensor([[2.0, -5.0]])).sum().backward()
    opt.step()
    torch.testing.assert_close(table.weight.detach()[3] - before[3], torch.tensor([-0.1, 0.1]), rtol=1e-5, atol=1e-6)


def test_state_dict_round_trip_continues_identically():
    ids = [torch.tensor([1, 2]), torch.tensor([2, 5]), torch.tensor([5, 5, 1])]
    targets = [torch.full((len(i), 3), 0.5) for i in ids]
    straight, _ = trajectory(LazyAdam, targets, ids)
    torch.manual_seed(0)
    table = torch.nn.Embedding(10, 3, sparse=True)
    opt = LazyAdam(table.parameters(), lr=0.05)
    for k, (i, t) in enumerate(zip(ids, targets, strict=True)):
        if k == 2:  # checkpoint and resume before the last step
            saved = opt.state_dict()
            opt = LazyAdam(table.parameters(), lr=0.05)
            opt.load_state_dict(saved)
        opt.zero_grad()
        ((table(i) - t) ** 2).sum().backward()
        opt.step()
    torch.testing.assert_close(table.weight.detach(), straight, rtol=0, atol=0)


def test_dense_gradients_and_bad_arguments_are_refused():
    w = torch.nn.Parameter(torch.zeros(3))
    w.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="sparse gradients only"):
        LazyAdam([w]).step()
    with pytest.raises(ValueError, match="lr > 0"):
        LazyAdam([w], lr=0)


def reference_steps(table: torch.nn.Embedding, batches, lr=0.01, betas=(0.9, 0.999), eps=1e-8):
    """The update LazyAdam made before it was chunked (one gather and one write per tensor over all
    touched rows, the weight by ``index_add_``, repeats summed by ``coalesce``), written out."""
    w = table.weight.detach().clone()
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    for step, (ids, target) in enumerate(batches, start=1):
        rows_of = w.clone().requires_grad_(True)
        ((rows_of[ids] - target) ** 2).sum().backward()
        touched = rows_of.grad.abs().sum(1).nonzero().squeeze(1)  # the rows a batch touched
        g = rows_of.grad[touched]
        mr = m.index_select(0, touched).lerp_(g, 1 - betas[0])
        vr = v.index_select(0, touched).mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
        m.index_copy_(0, touched, mr)
        v.index_copy_(0, touched, vr)
        step_size = lr * (1 - betas[1] ** step) ** 0.5 / (1 - betas[0] ** step)
        w.index_add_(0, touched, mr.div_(vr.sqrt_().add_(eps)), alpha=-step_size)
    return w, m, v


@pytest.mark.parametrize("chunk", [1, 3, 2048], ids=["row_by_row", "chunks_of_3", "default"])
def test_chunked_update_equals_the_one_pass_update_step_for_step(chunk, monkeypatch):
    """Chunking the touched rows changes no value: weights and moments as the one-pass update's,
    after every step, whatever the chunk size (a chunk boundary inside repeated ids included)."""
    from funnel.models.embedding import lookup
    from funnel.training import lazy_adam

    monkeypatch.setattr(lazy_adam, "CHUNK_ROWS", chunk)
    gen = torch.Generator().manual_seed(5)
    batches = []
    for _ in range(4):
        ids = (torch.rand(12, 3, generator=gen) ** 2 * 40).long()  # low ids repeat
        batches.append((ids, torch.randn(12, 3, 5, generator=gen)))
    torch.manual_seed(0)
    table = torch.nn.Embedding(40, 5, sparse=True)
    opt = LazyAdam(table.parameters(), lr=0.01)
    for k in range(1, len(batches) + 1):
        torch.manual_seed(0)
        want_w, want_m, want_v = reference_steps(torch.nn.Embedding(40, 5), batches[:k])
        ids, target = batches[k - 1]
        opt.zero_grad()
        ((lookup(table, ids) - target) ** 2).sum().backward()
        opt.step()
        state = opt.state[table.weight]
        torch.testing.assert_close(table.weight.detach(), want_w, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(state["exp_avg"], want_m, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(state["exp_avg_sq"], want_v, rtol=1e-6, atol=1e-12)
        assert state["exp_avg"].shape == state["exp_avg_sq"].shape == table.weight.shape  # the checkpointed layout


def test_touched_rows_sums_repeats_as_index_add_does_bit_for_bit():
    """The sort + embedding_bag sum gives the sums of unique + index_add_, to the last bit."""
    from funnel.training.lazy_adam import touched_rows

    gen = torch.Generator().manual_seed(2)
    ids = (torch.rand(5000, generator=gen) ** 3 * 300).long()
    values = torch.randn(5000, 7, generator=gen)
    rows, g = touched_rows(torch.sparse_coo_tensor(ids.unsqueeze(0), values, (300, 7), check_invariants=True))
    want_rows, inverse = torch.unique(ids, return_inverse=True)
    want = torch.zeros(len(want_rows), 7).index_add_(0, inverse, values)
    assert torch.equal(rows, want_rows) and torch.equal(g, want)
    empty = torch.sparse_coo_tensor(
        torch.zeros(1, 0, dtype=torch.long), torch.zeros(0, 7), (300, 7), check_invariants=True
    )
    rows, g = touched_rows(empty)
    assert rows.numel() == 0 and g.shape == (0, 7)
